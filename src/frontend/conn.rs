//! Who gets a connection, and for how long: admission and idle deadlines.
//!
//! ```text
//!  accept ──▶ a slot of max_connections ──▶ a share of the peer's address ──▶ serve
//!               (none free: close)            (share used up: close)          │
//!     watchdog: no request began within header_timeout of the accept, or   ◀─┘
//!     nothing in flight for idle_timeout since the last request → close
//!     (a reply still being written counts as in flight: see below)
//! ```
//!
//! hyper's own timers do not cover an idle socket: its header timeout starts
//! once HTTP/1 has been detected, so a peer that sends nothing (or half an
//! HTTP/2 preface, or nothing after a TLS handshake) would hold its slot
//! forever. The watchdog here counts requests, not bytes, so it covers all
//! three and HTTP/2 pings cannot keep an unused connection open either.
//!
//! A request is in flight until its reply's body is dropped ([`Tracked`]).
//! hyper drops the body once its last frame is *buffered*, so the body hands
//! its data over in small frames, which hyper takes only as its write buffer
//! drains: a large reply to a slow reader stays in flight while it is being
//! written. The socket is wrapped too ([`Writing`]): while output waits for
//! the peer to take it (a write returned `Pending` and no flush has
//! completed since), every write that makes progress counts as activity,
//! and the peer must take some every `idle_timeout`, in flight or not. A
//! slow reader gets its reply whole; one that stops reading is closed
//! `idle_timeout` after the last byte it took. The kernel's send buffer can
//! hold megabytes of a reply, which a slow reader takes for seconds with no
//! write from here; so at the deadline the watchdog asks the kernel whether
//! the peer acknowledged more bytes since it last looked
//! ([`Activity::peer_took`]) before it closes.
//!
//! hyper's header timer is off: it starts once the last frame of a reply is
//! buffered, and would cut a reply still being written. The watchdog times
//! request heads instead: the first within `header_timeout` of the accept,
//! each later HTTP/1 head within `header_timeout` of its first byte.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
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
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let below = match (lim.current, lim.maximum) {
        (Some(cur), Some(max)) => cur < max,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below {
        let want = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, want).is_ok() {
            return lim.maximum.unwrap_or(u64::MAX);
        }
    }
    lim.current.unwrap_or(u64::MAX)
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Output is queued that the peer has not taken yet (see [`Writing`]).
    waiting: AtomicBool,
    /// The socket, to ask the kernel how much of a reply it still holds
    /// (-1: not known).
    fd: AtomicI32,
    /// Bytes of output the peer had acknowledged when last looked at.
    acked: AtomicU64,
    /// When bytes of a next HTTP/1 request head arrived with no request in
    /// flight, in ms since `epoch` plus one (0: none since the last request).
    head_at: AtomicU64,
    /// Whether anything was read yet, and whether it was HTTP/2's preface.
    read_any: AtomicBool,
    h2: AtomicBool,
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
            waiting: AtomicBool::new(false),
            fd: AtomicI32::new(-1),
            acked: AtomicU64::new(0),
            head_at: AtomicU64::new(0),
            read_any: AtomicBool::new(false),
            h2: AtomicBool::new(false),
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
        self.head_at.store(0, Ordering::SeqCst);
        self.last.store(self.now_ms(), Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection is to be closed if nothing happens before: the
    /// first request must begin within `first` of the accept, and a
    /// connection with nothing in flight lives `idle` past its last request.
    /// While a request is in flight there is none, unless its reply waits
    /// for the peer: then the peer must take some of it every `idle`.
    pub fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            if !self.waiting.load(Ordering::SeqCst) {
                return None;
            }
            return Some(
                self.epoch + Duration::from_millis(self.last.load(Ordering::SeqCst)) + idle,
            );
        }
        if self.begun.load(Ordering::SeqCst) == 0 {
            return Some(self.epoch + first);
        }
        let idle_at = self.epoch + Duration::from_millis(self.last.load(Ordering::SeqCst)) + idle;
        // A next request head begun must be whole within `first` (hyper's
        // own header timer is off: it would start while a reply is still
        // being written, and cut it).
        Some(match self.head_at.load(Ordering::SeqCst) {
            0 => idle_at,
            at => idle_at.min(self.epoch + Duration::from_millis(at - 1) + first),
        })
    }

    /// The connection's socket, for [`Activity::peer_took`].
    pub fn set_socket(&self, fd: i32) {
        self.fd.store(fd, Ordering::SeqCst);
    }

    /// Whether the peer took bytes of a reply since the last look (the
    /// kernel's count of bytes it acknowledged grew); if so, that counts as
    /// activity now. Writes alone do not show it: a send buffer of
    /// megabytes takes a slow reader seconds to drain, with no write here
    /// meanwhile.
    pub fn peer_took(&self) -> bool {
        let fd = self.fd.load(Ordering::SeqCst);
        if fd < 0 {
            return false;
        }
        let Some(acked) = bytes_acked(fd) else {
            return false;
        };
        let before = self.acked.swap(acked, Ordering::SeqCst);
        // Only while output is still queued: a reply sent long ago was
        // acknowledged too, and must not keep an idle connection open.
        if acked > before && send_queue(fd).is_some_and(|q| q > 0) {
            self.last.store(self.now_ms(), Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Bytes read from the peer: with nothing in flight after a request,
    /// the start of the next HTTP/1 request head (HTTP/2 frames, pings
    /// among them, are not heads).
    fn read(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if !self.read_any.swap(true, Ordering::SeqCst) && data.starts_with(b"PRI * HTTP/2") {
            self.h2.store(true, Ordering::SeqCst);
        }
        if !self.h2.load(Ordering::SeqCst)
            && self.in_flight.load(Ordering::SeqCst) == 0
            && self.begun.load(Ordering::SeqCst) > 0
            && self.head_at.load(Ordering::SeqCst) == 0
        {
            self.head_at.store(self.now_ms() + 1, Ordering::SeqCst);
        }
    }

    /// A write after output had to wait for the peer moved bytes: the peer
    /// is reading a reply, so the connection is not idle.
    fn wrote(&self, n: usize) {
        if n > 0 && self.waiting.load(Ordering::Relaxed) {
            self.last.store(self.now_ms(), Ordering::SeqCst);
        }
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

/// Bytes of output the peer of TCP socket `fd` has acknowledged, where the
/// system says (Linux's `tcp_info.tcpi_bytes_acked`, since Linux 4.1).
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
fn bytes_acked(fd: i32) -> Option<u64> {
    // rustix has no TCP_INFO option, so this stays a libc call.
    // SAFETY: getsockopt writes at most `len` bytes of a `tcp_info` into
    // `info` and the length written into `len`.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        let need = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        (r == 0 && len as usize >= need).then_some(info.tcpi_bytes_acked)
    }
}

#[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
fn bytes_acked(_fd: i32) -> Option<u64> {
    None
}

/// Bytes in the send queue of socket `fd`, sent or not, that the peer has
/// not acknowledged (Linux's SIOCOUTQ).
#[cfg(target_os = "linux")]
fn send_queue(fd: i32) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer passed.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0 && n >= 0).then_some(n as usize)
}

#[cfg(not(target_os = "linux"))]
fn send_queue(_fd: i32) -> Option<usize> {
    None
}

/// Waits until the connection has been idle past its deadline.
pub async fn idle(activity: &Activity, first: Duration, idle: Duration) {
    // While a request is in flight there is no deadline; look again later.
    let recheck = first.min(idle).max(Duration::from_millis(100));
    loop {
        match activity.deadline(first, idle) {
            // The peer is still taking a reply out of the kernel's buffers.
            Some(at) if at <= Instant::now() && activity.peer_took() => {}
            Some(at) if at <= Instant::now() => return,
            Some(at) => tokio::time::sleep_until(at).await,
            None => tokio::time::sleep(recheck).await,
        }
    }
}

/// A connection's socket, reporting write progress to its [`Activity`]: a
/// reply hyper has buffered whole is still being sent while the peer takes
/// it, and the watchdog must not cut it (see the module docs).
pub struct Writing<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Writing<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Writing<S> {
        Writing { inner, activity }
    }

    /// Notes what a write did: `Pending` means output waits for the peer.
    fn track(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match &r {
            Poll::Pending => {
                if !self.activity.waiting.swap(true, Ordering::Relaxed) {
                    // The wait starts now, not at the end of the request.
                    self.activity
                        .last
                        .store(self.activity.now_ms(), Ordering::SeqCst);
                }
            }
            Poll::Ready(Ok(n)) => self.activity.wrote(*n),
            Poll::Ready(Err(_)) => {}
        }
        r
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Writing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.activity.read(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Writing<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        // hyper flushes once its buffer is written out: nothing waits now.
        if let Poll::Ready(Ok(())) = r {
            self.activity.waiting.store(false, Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Most bytes of a reply handed to hyper at once (see [`Tracked`]).
const FRAME_BYTES: usize = 16 << 10;

/// A response body that keeps its request in flight until it is sent.
///
/// Its data goes to hyper in frames of at most [`FRAME_BYTES`]: hyper asks
/// for the next frame only when its write buffer has room, so the body (and
/// with it the request) stays in flight until all but the last few frames
/// are written to the socket. A reply handed over whole (16 MiB in one
/// frame) would end the request at once, and hyper would time the peer out
/// for not sending its next request head (`http.header_timeout`) while it is
/// still reading this reply.
pub struct Tracked<B> {
    inner: B,
    /// The part of the last data frame not handed over yet.
    rest: bytes::Bytes,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            rest: bytes::Bytes::new(),
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = bytes::Bytes> + Unpin> Body for Tracked<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.rest.is_empty() {
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let n = self.rest.len().min(FRAME_BYTES);
        let data = self.rest.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
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
    async fn a_reply_being_read_slowly_is_not_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let idle_for = Duration::from_secs(5);
        let a = Activity::new();
        // The request ends (hyper buffered the reply whole) at once.
        drop(a.begin());
        let (mut peer, socket) = tokio::io::duplex(64);
        let mut socket = Writing::new(socket, a.clone());
        let writer = tokio::spawn(async move {
            socket.write_all(&[b'x'; 4096]).await.unwrap();
            socket.flush().await.unwrap();
        });
        // The peer takes 64 bytes a second: 64 s for the reply, far past
        // the idle deadline counted from the end of the request.
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < 4096 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                a.deadline(Duration::from_secs(1), idle_for).unwrap() > Instant::now(),
                "a reply the peer is still reading keeps its connection ({got} bytes read)"
            );
            got += peer.read(&mut buf).await.unwrap();
        }
        writer.await.unwrap();
        // Written out: idle again, from the last byte taken.
        let done = Instant::now();
        idle(&a, Duration::from_secs(1), idle_for).await;
        assert!(done.elapsed() <= idle_for, "idle once the reply is out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_request_head_is_timed_like_the_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (first, idle_for) = (Duration::from_secs(1), Duration::from_secs(60));
        let a = Activity::new();
        drop(a.begin());
        let (mut peer, socket) = tokio::io::duplex(1024);
        let mut socket = Writing::new(socket, a.clone());
        let t0 = Instant::now();
        peer.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = socket.read(&mut buf).await.unwrap();
        idle(&a, first, idle_for).await;
        assert_eq!(
            t0.elapsed(),
            first,
            "half a second request head: closed after header_timeout, not idle_timeout"
        );

        // HTTP/2 frames after a request are no request head.
        let a = Activity::new();
        let (mut peer, socket) = tokio::io::duplex(1024);
        let mut socket = Writing::new(socket, a.clone());
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let _ = socket.read(&mut buf).await.unwrap();
        drop(a.begin());
        let t1 = Instant::now();
        peer.write_all(b"a ping").await.unwrap();
        let _ = socket.read(&mut buf).await.unwrap();
        idle(&a, first, idle_for).await;
        assert_eq!(t1.elapsed(), idle_for);
    }

    #[tokio::test]
    async fn a_reply_goes_to_hyper_in_small_frames_and_stays_in_flight() {
        use http_body_util::BodyExt;
        let a = Activity::new();
        let mut body = Tracked::new(
            http_body_util::Full::new(bytes::Bytes::from(vec![7u8; 100_000])),
            a.begin(),
        );
        assert_eq!(body.size_hint().exact(), Some(100_000));
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
            assert_eq!(
                a.deadline(Duration::from_secs(1), Duration::from_secs(1)),
                None,
                "in flight while the body is handed over"
            );
        }
        assert_eq!(sizes.iter().sum::<usize>(), 100_000);
        assert!(sizes.iter().all(|&n| n <= FRAME_BYTES), "{sizes:?}");
        drop(body);
        assert!(
            a.deadline(Duration::from_secs(1), Duration::from_secs(1))
                .is_some()
        );
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
