//! A Postgres connection from accept to close: who gets a slot, how long it
//! may take to log in and to stay idle, and how large a message it may send.
//!
//! ```text
//!  accept ──▶ a slot of max_connections ──▶ a share of the peer's address ──▶ negotiate TLS
//!     │ (none: SSLRequest answered, then FATAL 53300, close)                   │
//!     │                                                                         ▼
//!     │          startup_timeout: logged in by then, or closed ◀── startup, password
//!     │                                                                         │
//!     │          idle_timeout: a message by then, or FATAL 57P05 ◀── queries ◀──┘
//!     │          a message over MAX_MESSAGE ─▶ ERROR 54000 at its header; its
//!     │            bytes are dropped as they arrive, the session goes on
//!     │          prepared statements / portals over max_prepared, or all
//!     │            connections' over max_prepared_bytes ─▶ ERROR 54000
//! ```
//!
//! pgwire's own `process_socket` gives a connection 60 s to log in, no idle
//! deadline, and reads a message of up to 1 GiB whole before it looks at it.
//! This loop is the same dispatch (`process_message`, `process_error`)
//! around a reader that checks each message's length header as the bytes
//! arrive, so an oversized message is refused after its first five bytes
//! and never held: its body is read and dropped, and the client gets an
//! ERROR and can go on (during startup, a FATAL).
//! Admission is the HTTP listener's ([`crate::frontend::conn::Admission`]).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError};
use datafusion_postgres::pgwire::messages::response::ErrorResponse;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::tokio::server::{
    MaybeTls, PgWireMessageServerCodec, negotiate_tls, process_error, process_message,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::{Framed, FramedParts};

use super::{PgServer, Prepared};
use crate::config::PgConfig;
use crate::error::{Explain, Report};
use crate::frontend::conn::{Admission, ConnLimits, Refused};

/// A frontend message, at most: SQL text is bounded at 1 MiB as over HTTP
/// (`guard::check_sql` says so with a clear error), plus room for a Bind's
/// parameters and the message's own fields.
pub const MAX_MESSAGE: usize = (1 << 20) + (64 << 10);

/// Connections being refused at once (each answers the SSLRequest and
/// sends its FATAL within [`REFUSE_WITHIN`]); beyond, a socket is closed
/// without a word. A client's SSLRequest and startup come at once; a
/// silent socket holds its place for the whole second, so there is room
/// for a flood of them and the real clients beside it.
const MAX_REFUSING: usize = 1024;
const REFUSE_WITHIN: Duration = Duration::from_secs(1);
/// After a FATAL, what the peer still sends is read and dropped (for this
/// long at most, until it pauses), so that the close does not reset the
/// connection before the client has read why (libpq reads only once it
/// has written its message).
const DRAIN_FOR: Duration = Duration::from_secs(3);

/// The connection limits of the endpoint (`[pg]`).
#[derive(Debug, Clone, Copy)]
pub struct PgLimits {
    pub max_connections: usize,
    pub per_address: usize,
    pub startup_timeout: Duration,
    pub idle_timeout: Duration,
    /// Prepared statements, and portals, per connection.
    pub max_prepared: usize,
    /// Their estimated bytes, all connections together.
    pub max_prepared_bytes: usize,
}

impl PgLimits {
    pub fn of(config: &PgConfig) -> PgLimits {
        let max = config.max_connections.max(1);
        PgLimits {
            max_connections: max,
            per_address: config
                .max_connections_per_address
                .unwrap_or((max / 4).max(1))
                .clamp(1, max),
            startup_timeout: config.startup_timeout,
            idle_timeout: config.idle_timeout,
            max_prepared: config.max_prepared.max(1),
            max_prepared_bytes: config.max_prepared_bytes.as_u64() as usize,
        }
    }
}

/// Why a connection, or one of its messages, was turned away.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("too many connections to the Postgres endpoint: all {max} are in use")]
    Full { max: usize },
    #[error("too many connections from {peer}: it holds its share of {share}")]
    AddressShare { peer: IpAddr, share: usize },
    #[error("a message of {len} bytes is over the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error(
        "terminating connection due to idle-session timeout (nothing sent for {})",
        humantime::format_duration(*.0)
    )]
    Idle(Duration),
    #[error("too many prepared statements on this connection: {max} at most")]
    TooManyStatements { max: usize },
    #[error("too many open portals on this connection: {max} at most")]
    TooManyPortals { max: usize },
    #[error("the prepared statements and portals of all connections hold their budget of {limit}")]
    PreparedBudget { limit: bytesize::ByteSize },
}

crate::explained!(ConnError);

impl Explain for ConnError {
    fn hint(&self) -> Option<String> {
        match self {
            ConnError::Full { .. } => {
                Some("close idle connections, or raise pg.max_connections".into())
            }
            ConnError::AddressShare { .. } => Some(
                "close idle connections, or raise pg.max_connections_per_address (behind a proxy every client shares its address)".into(),
            ),
            ConnError::MessageTooLarge { .. } => Some(
                "a statement is at most 1 MiB (as over HTTP), a message 1 MiB + 64 KiB; send smaller statements".into(),
            ),
            ConnError::Idle(_) => Some("reconnect; pg.idle_timeout sets the deadline".into()),
            ConnError::TooManyStatements { .. } => Some(
                "close or DEALLOCATE prepared statements you no longer use (pg.max_prepared)"
                    .into(),
            ),
            ConnError::TooManyPortals { .. } => {
                Some("close portals you no longer use (pg.max_prepared)".into())
            }
            ConnError::PreparedBudget { .. } => Some(
                "close or DEALLOCATE prepared statements and portals, or raise pg.max_prepared_bytes".into(),
            ),
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // too_many_connections
            ConnError::Full { .. } | ConnError::AddressShare { .. } => "53300",
            // program_limit_exceeded
            ConnError::MessageTooLarge { .. }
            | ConnError::TooManyStatements { .. }
            | ConnError::TooManyPortals { .. }
            | ConnError::PreparedBudget { .. } => "54000",
            // idle_session_timeout
            ConnError::Idle(_) => "57P05",
        }
    }
}

/// `e` as a Postgres error with `severity` (ERROR or FATAL).
fn error_info(e: &ConnError, severity: &str) -> ErrorInfo {
    let r = Report::of(e);
    let mut info = ErrorInfo::new(severity.into(), r.sqlstate.into(), r.message);
    info.hint = r.hint;
    info
}

/// The names of a connection's prepared statements and portals (pgwire's
/// store cannot count or list them) and their estimated bytes, kept in its
/// session extensions: the connection loop bounds them, `DEALLOCATE ALL`
/// and `DISCARD ALL` clear them. What they hold counts in the endpoint's
/// budget until they are removed or the connection ends.
#[derive(Debug, Default)]
pub struct Names {
    statements: BTreeMap<String, usize>,
    portals: BTreeMap<String, usize>,
    budget: Arc<AtomicUsize>,
}

/// What a planned statement is taken to hold, from its SQL.
fn statement_cost(sql: usize) -> usize {
    (32 << 10) + 16 * sql
}

impl Names {
    fn new(budget: Arc<AtomicUsize>) -> Names {
        Names {
            statements: BTreeMap::new(),
            portals: BTreeMap::new(),
            budget,
        }
    }

    fn map(&mut self, portal: bool) -> &mut BTreeMap<String, usize> {
        if portal {
            &mut self.portals
        } else {
            &mut self.statements
        }
    }

    fn insert(&mut self, portal: bool, name: &str, cost: usize) {
        let old = self.map(portal).insert(name.to_string(), cost);
        self.budget.fetch_add(cost, Ordering::Relaxed);
        if let Some(old) = old {
            self.budget.fetch_sub(old, Ordering::Relaxed);
        }
    }

    pub fn remove_statement(&mut self, name: &str) {
        if let Some(cost) = self.statements.remove(name) {
            self.budget.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Every statement's name, removed.
    pub fn take_statements(&mut self) -> Vec<String> {
        let taken = std::mem::take(&mut self.statements);
        self.budget
            .fetch_sub(taken.values().sum(), Ordering::Relaxed);
        taken.into_keys().collect()
    }

    pub fn clear_portals(&mut self) {
        let taken = std::mem::take(&mut self.portals);
        self.budget
            .fetch_sub(taken.values().sum(), Ordering::Relaxed);
    }

    fn retain(&mut self, portal: bool, mut keep: impl FnMut(&str) -> bool) {
        let mut freed = 0;
        self.map(portal).retain(|n, cost| {
            let k = keep(n);
            if !k {
                freed += *cost;
            }
            k
        });
        self.budget.fetch_sub(freed, Ordering::Relaxed);
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let held: usize = self.statements.values().chain(self.portals.values()).sum();
        self.budget.fetch_sub(held, Ordering::Relaxed);
    }
}

pub type SharedNames = Arc<Mutex<Names>>;

/// Serves `server` on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    server: Arc<PgServer>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: PgLimits,
) {
    let counters = server.startup.counters.clone();
    let admission = Admission::new(ConnLimits {
        max: limits.max_connections,
        per_address: limits.per_address,
        fd_limit: crate::frontend::conn::raise_fd_limit(),
    });
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let budget = Arc::new(AtomicUsize::new(0));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "postgres: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ticket = match admission.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                let e = match why {
                    Refused::Full => ConnError::Full {
                        max: limits.max_connections,
                    },
                    Refused::AddressShare => ConnError::AddressShare {
                        peer: peer.ip(),
                        share: limits.per_address,
                    },
                };
                if admission.should_warn() {
                    let r = admission.report();
                    tracing::warn!(%peer, error = %e, open = r.open, refused = r.refused, "postgres: connections refused");
                }
                // A flood of refusals is closed without a word.
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = tokio::time::timeout(REFUSE_WITHIN, refuse(socket, tls, e)).await;
                    });
                }
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (server, tls, budget) = (server.clone(), tls.clone(), budget.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            if let Err(e) = connection(socket, peer, server, tls, limits, budget).await {
                tracing::debug!(%peer, error = %e, "postgres: connection ended with an error");
            }
        });
    }
}

/// Tells a client turned away at accept why, as Postgres does: after the
/// SSLRequest is answered (libpq reads nothing else first) and the startup
/// message read, so psql prints the message itself.
async fn refuse(socket: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>, e: ConnError) {
    let Ok(Some(mut socket)) = negotiate_tls::<Prepared>(socket, tls).await else {
        return;
    };
    // The startup message (or a cancel request), so that closing does not
    // reset a connection with unread input.
    let _ = socket.next().await;
    let _ = socket
        .send(PgWireBackendMessage::ErrorResponse(ErrorResponse::from(
            error_info(&e, "FATAL"),
        )))
        .await;
    let _ = socket.close().await;
}

type Conn = Framed<Bounded<MaybeTls>, PgWireMessageServerCodec<Prepared>>;

/// One admitted connection, until it ends or a deadline passes.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    server: Arc<PgServer>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: PgLimits,
    budget: Arc<AtomicUsize>,
) -> io::Result<()> {
    let counters = server.startup.counters.clone();
    let startup_by = Instant::now() + limits.startup_timeout;
    let negotiated =
        match tokio::time::timeout_at(startup_by, negotiate_tls::<Prepared>(socket, tls)).await {
            Ok(n) => n?,
            Err(_) => {
                counters.startup_closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "postgres: no startup within the deadline, closed");
                return Ok(());
            }
        };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    let mut socket = bounded(negotiated);
    let names: SharedNames = socket
        .session_extensions()
        .get_or_insert_with(|| Mutex::new(Names::new(budget.clone())));

    let startup_handler = server.startup.clone();
    let simple = server.service.clone();
    let extended = server.service.clone();
    let copy = server.copy_handler();
    let cancel = server.cancel.clone();
    let errors = server.error_handler();
    use datafusion_postgres::pgwire::api::ErrorHandler;

    // The reader's error (a message refused) is followed by one None.
    let mut after_error = false;
    loop {
        let starting = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        );
        let msg = if starting {
            tokio::select! {
                _ = tokio::time::sleep_until(startup_by) => {
                    counters.startup_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "postgres: not logged in within the deadline, closed");
                    break;
                }
                msg = socket.next() => msg,
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(limits.idle_timeout) => {
                    counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "postgres: idle connection closed");
                    let e = ConnError::Idle(limits.idle_timeout);
                    fatal(&mut socket, &e).await;
                    break;
                }
                msg = socket.next() => msg,
            }
        };
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                let Some(over) = socket.get_mut().take_refused() else {
                    tracing::debug!(%peer, error = %e, "postgres: unreadable message");
                    break;
                };
                counters.too_large.fetch_add(1, Ordering::Relaxed);
                let e = ConnError::MessageTooLarge {
                    len: over.len,
                    max: MAX_MESSAGE,
                };
                tracing::debug!(%peer, error = %e, "postgres: message refused");
                if starting || over.kind.is_none() {
                    // No session to go on with.
                    fatal(&mut socket, &e).await;
                    break;
                }
                // The message is dropped as it arrives; the session goes on,
                // as after any other error (an extended-protocol message
                // waits for Sync). The reader gives one None after an error.
                let extended = over.kind.is_some_and(|k| b"PBDECHS".contains(&k));
                let err = PgWireError::UserError(Box::new(error_info(&e, "ERROR")));
                process_error(&mut socket, err, extended).await?;
                after_error = true;
                continue;
            }
            None if after_error => {
                after_error = false;
                continue;
            }
            None => break,
        };
        after_error = false;
        // A Terminate means the client is leaving: close.
        if matches!(msg, PgWireFrontendMessage::Terminate(_)) {
            break;
        }
        let is_extended = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => msg.is_extended_query(),
        };
        let tracked = Tracked::of(&msg);
        let result = match admit_message(&socket, &names, &tracked, &limits, &budget) {
            Err(e) => Err(PgWireError::UserError(Box::new(error_info(&e, "ERROR")))),
            Ok(()) => {
                process_message(
                    msg,
                    &mut socket,
                    startup_handler.clone(),
                    simple.clone(),
                    extended.clone(),
                    copy.clone(),
                    cancel.clone(),
                )
                .await
            }
        };
        settle_names(&socket, &names, &tracked);
        if let Err(mut e) = result {
            errors.on_error(&socket, &mut e);
            process_error(&mut socket, e, is_extended).await?;
        }
    }
    Ok(())
}

/// Sends a FATAL error and closes (after [`DRAIN_FOR`]).
async fn fatal(socket: &mut Conn, e: &ConnError) {
    let _ = socket
        .send(PgWireBackendMessage::ErrorResponse(ErrorResponse::from(
            error_info(e, "FATAL"),
        )))
        .await;
    let _ = socket.flush().await;
    // Not shut down yet: libpq reads only once it has sent its message,
    // and an end of stream would be all it reports.
    let io = socket.get_mut();
    // Until the peer has sent its message: a pause of 100 ms, or its close.
    let drain = async {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), io.inner.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    let _ = io.shutdown().await;
}

/// What a message does to the connection's named statements and portals
/// (with what a new one would hold).
enum Tracked {
    Statement(String, usize),
    Portal(String, usize),
    Closed,
    /// May run `DEALLOCATE` or `DISCARD`.
    Query,
    Other,
}

impl Tracked {
    fn of(msg: &PgWireFrontendMessage) -> Tracked {
        let named = |n: &Option<String>| n.as_deref().filter(|n| !n.is_empty()).map(String::from);
        match msg {
            PgWireFrontendMessage::Parse(p) => named(&p.name).map_or(Tracked::Other, |n| {
                Tracked::Statement(n, statement_cost(p.query.len()))
            }),
            PgWireFrontendMessage::Bind(b) => named(&b.portal_name).map_or(Tracked::Other, |n| {
                let params: usize = b.parameters.iter().flatten().map(|p| p.len()).sum();
                Tracked::Portal(n, 1024 + params)
            }),
            PgWireFrontendMessage::Close(_) => Tracked::Closed,
            PgWireFrontendMessage::Query(_) | PgWireFrontendMessage::Execute(_) => Tracked::Query,
            _ => Tracked::Other,
        }
    }
}

/// Refuses a new named statement or portal past the connection's bound or
/// the endpoint's budget.
fn admit_message(
    socket: &Conn,
    names: &SharedNames,
    tracked: &Tracked,
    limits: &PgLimits,
    budget: &AtomicUsize,
) -> Result<(), ConnError> {
    if !matches!(
        socket.state(),
        PgWireConnectionState::ReadyForQuery | PgWireConnectionState::QueryInProgress
    ) {
        return Ok(());
    }
    let names = names.lock().expect("names");
    let (held, name, cost, portal) = match tracked {
        Tracked::Statement(n, c) => (&names.statements, n, *c, false),
        Tracked::Portal(n, c) => (&names.portals, n, *c, true),
        _ => return Ok(()),
    };
    let max = limits.max_prepared;
    if !held.contains_key(name) && held.len() >= max {
        return Err(if portal {
            ConnError::TooManyPortals { max }
        } else {
            ConnError::TooManyStatements { max }
        });
    }
    let replaced = held.get(name).copied().unwrap_or(0);
    if budget.load(Ordering::Relaxed) + cost > limits.max_prepared_bytes + replaced {
        return Err(ConnError::PreparedBudget {
            limit: bytesize::ByteSize::b(limits.max_prepared_bytes as u64),
        });
    }
    Ok(())
}

/// Brings the names to what the store holds after a message.
fn settle_names(socket: &Conn, names: &SharedNames, tracked: &Tracked) {
    let store = socket.portal_store();
    let mut names = names.lock().expect("names");
    match tracked {
        Tracked::Statement(n, cost) => {
            if store.get_statement(n).is_some() {
                names.insert(false, n, *cost);
            }
        }
        Tracked::Portal(n, cost) => {
            if store.get_portal(n).is_some() {
                names.insert(true, n, *cost);
            }
        }
        Tracked::Closed | Tracked::Query => {
            names.retain(false, |n| store.get_statement(n).is_some());
            names.retain(true, |n| store.get_portal(n).is_some());
        }
        Tracked::Other => {}
    }
}

/// The negotiated connection, read through [`Bounded`]; the bytes pgwire
/// already buffered go through it too.
fn bounded(framed: Framed<MaybeTls, PgWireMessageServerCodec<Prepared>>) -> Conn {
    let old = framed.into_parts();
    let mut io = Bounded::new(old.io, MAX_MESSAGE);
    io.unprocessed.extend_from_slice(&old.read_buf);
    let mut parts = FramedParts::new(io, old.codec);
    parts.write_buf = old.write_buf;
    Framed::from_parts(parts)
}

/// A message refused for its length: its type (none for the first, the
/// startup message) and the length its header gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    pub kind: Option<u8>,
    pub len: usize,
}

/// Where the reader is in the message stream: every message is a length
/// (and after the first, a type byte before it) and a body.
#[derive(Debug)]
struct Frames {
    typed: bool,
    header: [u8; 5],
    have: usize,
    /// Body bytes still to pass on (or to drop).
    body: usize,
    keep: bool,
    max: usize,
}

impl Frames {
    fn new(max: usize) -> Frames {
        Frames {
            typed: false,
            header: [0; 5],
            have: 0,
            body: 0,
            keep: true,
            max,
        }
    }

    /// Follows `bytes`, appending to `out` what is to be handed on: a
    /// header once it is whole and within the limit, and its body; the
    /// header and body of a message over the limit are dropped. Stops
    /// after such a header: how many bytes it used, and the message.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> (usize, Option<Oversized>) {
        let mut used = 0;
        while used < bytes.len() {
            let rest = &bytes[used..];
            if self.body > 0 {
                let n = self.body.min(rest.len());
                if self.keep {
                    out.extend_from_slice(&rest[..n]);
                }
                self.body -= n;
                used += n;
                continue;
            }
            let want = if self.typed { 5 } else { 4 };
            let n = (want - self.have).min(rest.len());
            self.header[self.have..self.have + n].copy_from_slice(&rest[..n]);
            self.have += n;
            used += n;
            if self.have < want {
                continue;
            }
            let l = &self.header[want - 4..want];
            let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
            let kind = self.typed.then_some(self.header[0]);
            self.have = 0;
            self.typed = true;
            // A length below 4 is pgwire's to refuse.
            self.body = len.saturating_sub(4);
            self.keep = len <= self.max;
            if !self.keep {
                return (used, Some(Oversized { kind, len }));
            }
            out.extend_from_slice(&self.header[..want]);
        }
        (used, None)
    }
}

/// A reader that hands pgwire messages within the limit, and reads and
/// drops a message over it as its bytes arrive — never holding more than
/// one read of it. The refusal is an error of the read right after the
/// messages before it; the messages after it follow.
pub struct Bounded<IO> {
    inner: IO,
    frames: Frames,
    /// Read from the peer, not yet followed (the bytes after an oversized
    /// header wait here while it is reported).
    unprocessed: Vec<u8>,
    /// Followed, to hand on.
    ready: Vec<u8>,
    handed: usize,
    /// A refusal to report, then the last one reported.
    pending: Option<Oversized>,
    refused: Option<Oversized>,
    eof: bool,
}

impl<IO> Bounded<IO> {
    fn new(inner: IO, max: usize) -> Bounded<IO> {
        Bounded {
            inner,
            frames: Frames::new(max),
            unprocessed: Vec::new(),
            ready: Vec::new(),
            handed: 0,
            pending: None,
            refused: None,
            eof: false,
        }
    }

    /// The message the last error of a read refused, once.
    fn take_refused(&mut self) -> Option<Oversized> {
        self.refused.take()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Bounded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.handed < this.ready.len() {
                let n = (this.ready.len() - this.handed).min(buf.remaining());
                buf.put_slice(&this.ready[this.handed..this.handed + n]);
                this.handed += n;
                if this.handed == this.ready.len() {
                    this.ready.clear();
                    this.handed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(o) = this.pending.take() {
                this.refused = Some(o);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message of {} bytes is over the limit", o.len),
                )));
            }
            if !this.unprocessed.is_empty() {
                let (used, oversized) = this.frames.feed(&this.unprocessed, &mut this.ready);
                this.unprocessed.drain(..used);
                this.pending = oversized;
                continue;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 << 10];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => this.unprocessed.extend_from_slice(read.filled()),
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Bounded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_over_the_limit_is_dropped_and_the_others_pass() {
        let mut f = Frames::new(100);
        let mut out = Vec::new();
        // Startup: untyped, 8 bytes.
        let startup = [0, 0, 0, 8, 0, 3, 0, 0];
        assert_eq!(f.feed(&startup, &mut out), (8, None));
        // A query of 50 bytes, fed a byte at a time.
        let mut q = vec![b'Q', 0, 0, 0, 50];
        q.extend(std::iter::repeat_n(b'x', 46));
        for b in &q {
            assert_eq!(f.feed(std::slice::from_ref(b), &mut out), (1, None));
        }
        let mut want = startup.to_vec();
        want.extend(&q);
        assert_eq!(out, want, "messages within the limit pass whole");
        // One within, one over (256 bytes), one within, in one read.
        let mut three = q.clone();
        three.extend([b'Q', 0, 0, 1, 0]);
        three.extend([b'y'; 252]);
        three.extend(&q);
        out.clear();
        let (used, over) = f.feed(&three, &mut out);
        assert_eq!(
            over,
            Some(Oversized {
                kind: Some(b'Q'),
                len: 256
            })
        );
        assert_eq!(used, q.len() + 5, "stops after the oversized header");
        assert_eq!(out, q);
        out.clear();
        assert_eq!(f.feed(&three[used..], &mut out), (three.len() - used, None));
        assert_eq!(out, q, "the oversized body is dropped, the next passes");
    }
}
