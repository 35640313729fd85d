//! Failpoints: named places where a test can make the process die, to prove
//! that a crash there loses nothing and counts nothing twice.
//!
//! `LAMBDAFLOW_FAILPOINTS=archive-after-parquet,batch-after-publish` makes the
//! process abort (like `kill -9`: no destructors, no flush) the first time it
//! reaches one of the named points. Unset, a failpoint costs one branch.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("LAMBDAFLOW_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if the failpoint `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("lambdaflow: failpoint `{name}` hit, aborting");
        std::process::abort();
    }
}
