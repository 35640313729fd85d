//! `lambdaflow serve`: the HTTP server in front of a [`Node`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, TlsConfig};
use crate::frontend::auth::Auth;
use crate::frontend::conn;
use crate::frontend::http::{self, ApiState};
pub use crate::node::{Node, NodeError};

/// Ingest requests whose bodies may be in memory at once.
const MAX_IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Node(#[from] NodeError),
    #[error("could not listen on {addr}")]
    Bind {
        addr: SocketAddr,
        /// The flag or key that sets this address.
        set_by: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {addr}: it is not a loopback address, and no access tokens are configured"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("the HTTP server failed")]
    Http(#[source] std::io::Error),
}

crate::explained!(ServeError);

impl crate::error::Explain for ServeError {
    fn hint(&self) -> Option<String> {
        match self {
            ServeError::Bind { set_by, .. } => Some(format!(
                "is another server using that port? pick another with {set_by}"
            )),
            ServeError::NotLoopback { .. } => Some(
                "add [auth] tokens with scopes \"ingest\" and \"query\", or listen on 127.0.0.1"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// `[http.tls]` (or `[pg.tls]`) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("could not load the TLS {what} {}: {detail}", path.display())]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    detail: String,
}

crate::explained!(TlsError);

impl crate::error::Explain for TlsError {
    fn hint(&self) -> Option<String> {
        Some("tls wants PEM files: the certificate chain and its private key".into())
    }
}

/// A running HTTP server (and Postgres endpoint, if configured).
pub struct Running {
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// Where Postgres clients connect, if `[pg] listen` is set.
    pub pg: Option<PgRunning>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// The Postgres endpoint of a running server.
pub struct PgRunning {
    pub addr: SocketAddr,
    pub tls: bool,
    pub counters: Arc<crate::frontend::pg::PgCounters>,
    task: JoinHandle<()>,
}

impl PgRunning {
    /// The address a client connects to, as a URL.
    pub fn url(&self) -> String {
        crate::frontend::pg::describe(self.addr, self.tls)
    }
}

impl Running {
    /// Stops accepting, finishes requests in flight, and returns.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(pg) = self.pg.take() {
            pg.task.abort();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .map_err(|e| ServeError::Http(std::io::Error::other(e)))?
    }
}

/// Loads `[http.tls]`: a rustls server config from PEM files.
fn tls_acceptor(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError {
            what: "certificate",
            path: tls.cert.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError {
            what: "certificate",
            path: tls.cert.clone(),
            detail: "no CERTIFICATE block in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError {
        what: "key",
        path: tls.key.clone(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TlsError {
            what: "certificate and key",
            path: tls.cert.clone(),
            detail: e.to_string(),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds `listen` and serves the API of `node` until stopped.
///
/// The accept loop is hyper's, not `axum::serve`, for the limits a server on
/// a network needs (see [`conn`]): a bounded number of connections with a
/// share per address, a deadline for the first request and for idle
/// connections, request headers within `http.header_timeout` (slow-loris
/// clients are dropped), and TLS when `[http.tls]` is set.
pub async fn start(node: &Node, listen: SocketAddr) -> Result<Running, ServeError> {
    let auth = Auth::from_config(&node.config.auth);
    if !listen.ip().is_loopback() && !auth.enabled() {
        return Err(ServeError::NotLoopback { addr: listen });
    }
    let http = &node.config.http;
    let tls = http
        .tls
        .as_ref()
        .map(|t| tls_acceptor(t, &[b"h2", b"http/1.1"]))
        .transpose()?;
    let limits = conn::ConnLimits::new(http, conn::raise_fd_limit());
    tracing::info!(
        open_files = limits.fd_limit,
        max_connections = limits.max,
        per_address = limits.per_address,
        "connection limits"
    );
    if limits.max < http.max_connections {
        tracing::warn!(
            configured = http.max_connections,
            set = limits.max,
            open_files = limits.fd_limit,
            "http.max_connections lowered to fit the open-files limit (raise it with `ulimit -n`)"
        );
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            set_by: "--listen",
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let admission = conn::Admission::new(limits);
    let mut state = ApiState::new(
        node.ingest.clone(),
        node.config.ingest.max_body.as_u64() as usize,
        MAX_IN_FLIGHT,
        Some(node.layers()),
    )
    .with_auth(auth)
    .with_body_timeout(http.body_timeout)
    .with_connections(admission.clone());
    // Postgres clients share the HTTP reads' query pool (and its limits).
    let pg = match node.config.pg.listen {
        Some(addr) => Some(start_pg(node, addr, state.queries.clone()).await?),
        None => None,
    };
    state.pg = pg.as_ref().map(|p| p.counters.clone());
    let state = Arc::new(state);
    let app = http::router(state);
    let (first, idle) = (http.header_timeout, http.idle_timeout);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watchdog times request heads (`conn`): hyper's timer would
        // start while a large reply is still being written, and cut it.
        .header_read_timeout(None)
        // Past the API's own limit, so a request with too many headers gets
        // its 431 in the documented shape (see `http::MAX_HEADERS`).
        .max_headers(http::HYPER_MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        // Pings find peers that vanished without closing; an answered ping
        // does not count as use (the watchdog counts requests).
        .keep_alive_interval(Some((idle / 2).max(Duration::from_secs(1))))
        .keep_alive_timeout(first);
    let (tx, mut rx) = oneshot::channel::<()>();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut rx => break,
            };
            let ticket = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(why) => {
                    // A flood is one warning per few seconds, not one a socket.
                    if admission.should_warn() {
                        let r = admission.report();
                        tracing::warn!(%peer, ?why, open = r.open, refused = r.refused, "connections refused: no slot free");
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let activity = conn::Activity::new();
            activity.set_socket(std::os::fd::AsRawFd::as_raw_fd(&stream));
            let svc = {
                let (app, activity) = (app.clone(), activity.clone());
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let in_flight = activity.begin();
                    let mut app = app.clone();
                    async move {
                        use tower::Service;
                        let resp = app.call(req).await?;
                        Ok::<_, std::convert::Infallible>(
                            resp.map(|body| conn::Tracked::new(body, in_flight)),
                        )
                    }
                })
            };
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let tls = tls.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                let _ticket = ticket;
                // The handshake counts against the first-request deadline.
                let serve = async {
                    match tls {
                        None => {
                            let stream = conn::Writing::new(stream, activity.clone());
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                tracing::debug!(%peer, "TLS handshake failed");
                                return Ok(());
                            };
                            let stream = conn::Writing::new(stream, activity.clone());
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                    }
                };
                tokio::select! {
                    result = serve => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    _ = conn::idle(&activity, first, idle) => {
                        admission.closed_idle();
                        tracing::debug!(%peer, served = activity.served(), "idle connection closed");
                    }
                }
            });
        }
        drop(listener);
        // Requests in flight finish; idle connections close.
        graceful.shutdown().await;
        Ok(())
    });
    Ok(Running {
        addr,
        scheme,
        pg,
        stop: Some(tx),
        task,
    })
}

/// Binds `[pg] listen` and serves the Postgres wire protocol over the
/// views: the same refusal off loopback without tokens as HTTP, TLS from
/// `[pg] tls` or else `[http] tls`, the same query pool.
async fn start_pg(
    node: &Node,
    listen: SocketAddr,
    queries: Arc<crate::serving::pool::QueryPool>,
) -> Result<PgRunning, ServeError> {
    use crate::frontend::pg;
    let auth = Arc::new(Auth::from_config(&node.config.auth));
    if !listen.ip().is_loopback() && !auth.enabled() {
        return Err(ServeError::NotLoopback { addr: listen });
    }
    let config = &node.config.pg;
    let tls = config
        .tls
        .as_ref()
        .or(node.config.http.tls.as_ref())
        .map(|t| tls_acceptor(t, &[b"postgresql"]))
        .transpose()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            set_by: "pg.listen",
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let layers = node.layers();
    let counters = Arc::new(pg::PgCounters::default());
    let server = Arc::new(pg::PgServer::new(
        layers.serving.clone(),
        &layers.catalog,
        queries,
        auth,
        crate::serving::query::SqlLimits::default(),
        tls.is_some(),
        counters.clone(),
    ));
    let tls_on = tls.is_some();
    let task = tokio::spawn(pg::serve(listener, server, tls, pg::PgLimits::of(config)));
    Ok(PgRunning {
        addr,
        tls: tls_on,
        counters,
        task,
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// How `serve` reads its config again on SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// On each SIGHUP, reloads the config's views into `node`.
async fn reload_on_hangup(node: Arc<Node>, reload: Reload) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let config = match reload() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the config does not load; nothing changed");
                continue;
            }
        };
        match node.reload(config).await {
            Ok(r) if r.changes.is_empty() && r.overrides.is_empty() => {
                tracing::info!("SIGHUP: the views are as configured")
            }
            Ok(r) => {
                for c in r.changes {
                    tracing::info!(view = %c.view, change = c.change, "SIGHUP: view change accepted; building it in the background");
                }
                if r.overrides.is_empty() {
                    continue;
                }
                let views: Vec<&str> = r.overrides.iter().map(|o| o.view.as_str()).collect();
                tracing::warn!(
                    views = ?views,
                    "SIGHUP: the views are as configured but for changes saved through the API, which override the file's entries of these views (see above; `DELETE /v1/views/NAME/change` returns one to the file's definition)"
                );
            }
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "SIGHUP: the reloaded views are refused; nothing changed")
            }
        }
    }
}

/// `lambdaflow serve`: runs until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), ServeError> {
    run_reloading(config, None).await
}

/// [`run`], reloading the views with `reload` on SIGHUP.
pub async fn run_reloading(config: Config, reload: Option<Reload>) -> Result<(), ServeError> {
    let listen = config.listen;
    let node = Node::open(config).await?;
    let server = start(&node, listen).await?;
    // One plain line on stdout that scripts and tests wait for (they may
    // stop reading after it: nothing else goes to stdout, and a closed
    // stdout is no reason to stop serving).
    let pg = server
        .pg
        .as_ref()
        .map(|pg| format!(", postgres: {}", pg.url()))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stdout(),
        "lambdaflow listening on {}://{} (data: {}{pg})",
        server.scheme,
        server.addr,
        node.data_dir().display()
    );
    tracing::info!(addr = %server.addr, data = %node.data_dir().display(), "serving");
    let node = Arc::new(node);
    let hangup = reload.map(|r| tokio::spawn(reload_on_hangup(node.clone(), r)));
    shutdown_signal().await;
    if let Some(h) = hangup {
        h.abort();
    }
    tracing::info!("shutting down: finishing requests in flight");
    server.stop().await?;
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
