//! The NDJSON event decoder on arbitrary bytes: it must never panic, and
//! every non-blank line must come out either accepted or rejected with its
//! line number (the same properties the proptest in `src/stream/decode.rs`
//! checks on every `cargo test`).
#![no_main]

use std::sync::{Arc, OnceLock};

use lambdaflow::schema::EventSchema;
use lambdaflow::stream::{Decoder, Partitioning};
use libfuzzer_sys::fuzz_target;

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        Decoder::new(
            Arc::new(EventSchema::paper()),
            Partitioning::Key {
                field: 1,
                partitions: 4,
            },
        )
    })
}

fuzz_target!(|body: &[u8]| {
    let d = decoder().decode(body, 0);
    let lines = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    assert_eq!(d.accepted + d.rejects.len(), lines);
    let rows: usize = d.batches.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(rows, d.accepted);
    for r in &d.rejects {
        assert!(r.line >= 1 && !r.reason.is_empty());
        assert!(r.raw.end <= body.len());
    }
});
