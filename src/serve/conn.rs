//! Who gets a connection, and for how long: admission and idle deadlines.
//!
//! ```text
//!  accept ──▶ a slot of max_connections ──▶ a share of the peer's address ──▶ serve
//!               (none free: close)            (share used up: close)          │
//!     watchdog: no request began within header_timeout of the accept, or   ◀─┘
//!     nothing in flight for idle_timeout since the last request → close
//! ```
//!
//! hyper's own timers do not cover an idle socket: its header timeout starts
//! once HTTP/1 has been detected, so a peer that sends nothing (or half an
//! HTTP/2 preface, or nothing after a TLS handshake) would hold its slot
//! forever. The watchdog here counts requests, not bytes, so it covers all
//! three and HTTP/2 pings cannot keep an unused connection open either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::config::HttpConfig;

/// File descriptors kept back from connections: log segments, Parquet and
/// Delta files, dead letters, the listener.
const RESERVED_FDS: u64 = 512;

/// The connection limits in force, after the file-descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at once.
    pub max: usize,
    /// Open connections at once from one IP address.
    pub per_address: usize,
    /// The process's soft file-descriptor limit after raising it.
    pub fd_limit: u64,
}

impl ConnLimits {
    /// The configured limits, lowered to what `fd_limit` leaves room for:
    /// a connection is one descriptor, and the layers need their own.
    pub fn new(http: &HttpConfig, fd_limit: u64) -> ConnLimits {
        let room = fd_limit
            .saturating_sub(RESERVED_FDS.min(fd_limit / 2))
            .max(1);
        let max = http.max_connections.min(room as usize);
        let per_address = http
            .max_connections_per_address
            .unwrap_or((max / 4).max(1))
            .min(max);
        ConnLimits {
            max,
            per_address,
            fd_limit,
        }
    }
}

/// Raises the soft limit on open files to the hard limit (the default soft
/// limit, often 1,024, is far below what a server needs); returns the soft
/// limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Admission: one slot of the total and one of the peer address's share.
pub struct Admission {
    limits: ConnLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    epoch: Instant,
    /// When a refusal was last logged, in ms since `epoch` (plus one).
    warned: AtomicU64,
}

/// `/v1/status` `connections`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnReport {
    pub open: usize,
    pub max: usize,
    pub per_address: usize,
    pub open_files_limit: u64,
    /// Connections closed at accept: no slot, or the address's share used up.
    pub refused: u64,
    /// Connections closed by the first-request or idle deadline.
    pub idle_closed: u64,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Full,
    /// This address holds its whole share.
    AddressShare,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            open: Mutex::new((0, HashMap::new())),
            refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            epoch: Instant::now(),
            warned: AtomicU64::new(0),
        })
    }

    /// Whether to log a refusal now: at most one line every 10 s.
    pub fn should_warn(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.warned.load(Ordering::Relaxed);
        (last == 0 || now >= last + 10_000)
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn report(&self) -> ConnReport {
        ConnReport {
            open: self.open(),
            max: self.limits.max,
            per_address: self.limits.per_address,
            open_files_limit: self.limits.fd_limit,
            refused: self.refused.load(Ordering::Relaxed),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection closed by its deadline.
    pub fn closed_idle(&self) {
        self.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// A slot for a connection from `peer`, released when the ticket drops.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refused> {
        let mut open = self.open.lock().expect("admission lock");
        if open.0 >= self.limits.max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        let n = open.1.entry(peer).or_insert(0);
        if *n >= self.limits.per_address {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::AddressShare);
        }
        *n += 1;
        open.0 += 1;
        Ok(Ticket {
            admission: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("admission lock").0
    }
}

/// One admitted connection.
pub struct Ticket {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().expect("admission lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

/// What a connection has done, for its watchdog.
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Requests begun so far.
    begun: AtomicU64,
    /// When the last request began or ended, in ms since `epoch`.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            last: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request begins; it counts as in flight until the guard drops (held
    /// by the response body, so a long reply is not cut off as idle).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.last.store(self.now_ms(), Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection is to be closed if nothing happens before: the
    /// first request must begin within `first` of the accept, and a
    /// connection with nothing in flight lives `idle` past its last request.
    /// `None` while a request is in flight.
    pub fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if self.begun.load(Ordering::SeqCst) == 0 {
            return Some(self.epoch + first);
        }
        Some(self.epoch + Duration::from_millis(self.last.load(Ordering::SeqCst)) + idle)
    }

    /// Whether a request was ever begun on this connection.
    pub fn served(&self) -> bool {
        self.begun.load(Ordering::SeqCst) > 0
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last.store(self.0.now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until the connection has been idle past its deadline.
pub async fn idle(activity: &Activity, first: Duration, idle: Duration) {
    // While a request is in flight there is no deadline; look again later.
    let recheck = first.min(idle).max(Duration::from_millis(100));
    loop {
        match activity.deadline(first, idle) {
            Some(at) if at <= Instant::now() => return,
            Some(at) => tokio::time::sleep_until(at).await,
            None => tokio::time::sleep(recheck).await,
        }
    }
}

/// A response body that keeps its request in flight until it is sent.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(max: usize, per: Option<usize>) -> HttpConfig {
        HttpConfig {
            max_connections: max,
            max_connections_per_address: per,
            ..HttpConfig::default()
        }
    }

    #[test]
    fn limits_leave_room_for_the_layers_files() {
        let l = ConnLimits::new(&http(4096, None), 1024);
        assert_eq!(l.max, 512, "1,024 descriptors: half kept back");
        assert_eq!(l.per_address, 128);
        let l = ConnLimits::new(&http(4096, None), 1 << 20);
        assert_eq!((l.max, l.per_address), (4096, 1024));
        let l = ConnLimits::new(&http(100, Some(1000)), 1 << 20);
        assert_eq!(l.per_address, 100, "a share is never above the total");
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let a = Admission::new(ConnLimits::new(&http(4, Some(2)), 1 << 20));
        let one: IpAddr = "127.0.0.2".parse().unwrap();
        let two: IpAddr = "127.0.0.1".parse().unwrap();
        let t1 = a.admit(one).unwrap();
        let _t2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some(Refused::AddressShare));
        let _t3 = a.admit(two).unwrap();
        let _t4 = a.admit(two).unwrap();
        assert_eq!(
            a.admit("10.0.0.1".parse().unwrap()).err(),
            Some(Refused::Full)
        );
        drop(t1);
        assert_eq!(a.open(), 3);
        assert!(a.admit(one).is_ok(), "a closed connection frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_count_requests_not_bytes() {
        let (first, idle_for) = (Duration::from_secs(1), Duration::from_secs(5));
        let a = Activity::new();
        let t0 = Instant::now();
        idle(&a, first, idle_for).await;
        assert_eq!(
            t0.elapsed(),
            first,
            "no request: closed after the first deadline"
        );

        let a = Activity::new();
        let req = a.begin();
        assert_eq!(a.deadline(first, idle_for), None, "in flight: no deadline");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(req);
        let t1 = Instant::now();
        idle(&a, first, idle_for).await;
        assert_eq!(
            t1.elapsed(),
            idle_for,
            "idle: closed idle_timeout after the last reply"
        );
    }
}
