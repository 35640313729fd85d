//! Time, injected: the layers ask a [`Clock`] rather than the system, so a
//! seeded simulation can drive them through chunk ages and freshness
//! deterministically (TigerBeetle's and FoundationDB's lesson).
//!
//! ```text
//!  SystemClock ── serve (monotonic Instant + wall clock)
//!  ManualClock ── simulation: time moves only when the test advances it
//! ```
//!
//! Only decisions read it: when an open chunk closes by age (speed layer) and
//! when a high-water mark moved (serving). Timings for metrics keep using
//! `Instant`: they change no outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic time since an arbitrary origin.
    fn elapsed(&self) -> Duration;
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn unix_ms(&self) -> i64;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock {
            origin: Instant::now(),
        })
    }
}

impl Clock for SystemClock {
    fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    fn unix_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    ms: AtomicU64,
    epoch_ms: i64,
}

impl ManualClock {
    /// Starts at `epoch_ms` on the wall clock.
    pub fn new(epoch_ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            ms: AtomicU64::new(0),
            epoch_ms,
        })
    }

    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn elapsed(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::SeqCst))
    }

    fn unix_ms(&self) -> i64 {
        self.epoch_ms + self.ms.load(Ordering::SeqCst) as i64
    }
}
