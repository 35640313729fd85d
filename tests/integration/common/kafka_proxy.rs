//! A Kafka fault proxy: a TCP proxy in front of a broker that reads the
//! Kafka protocol's framing (a 4-byte length, then the request header's API
//! key) and, on a seeded draw, does to a reader what a real cluster does
//! when a broker restarts or a network path fails: the connection reset
//! right after a Fetch or ListOffsets request was forwarded (the request
//! reached the broker, the answer never comes back), or the answer held
//! back for a while.
//!
//! ```text
//!  node, producers ──TCP──▶ proxy (the broker's advertised address) ──▶ broker
//!                            Fetch / ListOffsets: reset after forwarding, or stall the answer
//!                            Produce, Metadata, everything else: passed on
//! ```
//!
//! Produce requests are passed on untouched: tansu 0.6.0 does not
//! de-duplicate an idempotent producer's retried batch as Kafka does, so a
//! reset produce would store records twice that a real cluster stores once.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Kafka API keys the proxy acts on.
const FETCH: i16 = 1;
const LIST_OFFSETS: i16 = 2;

/// What the proxy did, counted.
#[derive(Debug, Default)]
pub struct Counts {
    pub connections: AtomicU64,
    pub reads: AtomicU64,
    pub resets: AtomicU64,
    pub stalls: AtomicU64,
}

/// A running proxy; it serves until the test process ends.
pub struct KafkaProxy {
    pub port: u16,
    pub counts: Arc<Counts>,
}

impl KafkaProxy {
    /// A proxy on `port` to the broker at `upstream` (`127.0.0.1:P`): per
    /// read request, `reset` and `stall` per mille chances, drawn from
    /// `seed`.
    pub fn start(port: u16, upstream: &str, seed: u64, reset: u64, stall: u64) -> KafkaProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the Kafka proxy");
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                c.connections.fetch_add(1, Ordering::Relaxed);
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let rng = Rng(seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let c = c.clone();
                std::thread::spawn(move || relay(conn, up, rng, reset, stall, &c));
            }
        });
        KafkaProxy { port, counts }
    }
}

struct Rng(u64);

impl Rng {
    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Client → broker one request frame at a time (so the API key is known),
/// broker → client as bytes come; a stall holds the answers back.
fn relay(client: TcpStream, up: TcpStream, mut rng: Rng, reset: u64, stall: u64, counts: &Counts) {
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let stall_ms = Arc::new(AtomicU64::new(0));
    let answers = {
        let (mut from_up, mut to_client) = (up.try_clone().unwrap(), client.try_clone().unwrap());
        let stall_ms = stall_ms.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from_up.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let hold = stall_ms.swap(0, Ordering::Relaxed);
                if hold > 0 {
                    std::thread::sleep(Duration::from_millis(hold));
                }
                if to_client.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to_client.shutdown(Shutdown::Both);
        })
    };
    let (mut from_client, mut to_up) = (client.try_clone().unwrap(), up.try_clone().unwrap());
    loop {
        let mut len = [0u8; 4];
        if from_client.read_exact(&mut len).is_err() {
            break;
        }
        let n = i32::from_be_bytes(len).max(0) as usize;
        let mut frame = vec![0u8; n];
        if from_client.read_exact(&mut frame).is_err() {
            break;
        }
        let api_key = if n >= 2 {
            i16::from_be_bytes([frame[0], frame[1]])
        } else {
            -1
        };
        if to_up.write_all(&len).is_err() || to_up.write_all(&frame).is_err() {
            break;
        }
        if api_key == FETCH || api_key == LIST_OFFSETS {
            counts.reads.fetch_add(1, Ordering::Relaxed);
            let draw = rng.next() % 1000;
            if draw < reset {
                // The request reached the broker; its answer never returns.
                counts.resets.fetch_add(1, Ordering::Relaxed);
                let _ = client.shutdown(Shutdown::Both);
                let _ = up.shutdown(Shutdown::Both);
                break;
            } else if draw < reset + stall {
                counts.stalls.fetch_add(1, Ordering::Relaxed);
                stall_ms.store(200 + rng.next() % 1300, Ordering::Relaxed);
            }
        }
    }
    let _ = up.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
    let _ = answers.join();
}
