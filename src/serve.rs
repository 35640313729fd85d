//! `lambdaflow serve`: the HTTP server in front of a [`Node`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::api::auth::Auth;
use crate::api::{self, ApiState};
use crate::config::{Config, ConfigError, TlsConfig};
pub use crate::node::{Node, NodeError};

/// Ingest requests whose bodies may be in memory at once.
const MAX_IN_FLIGHT: usize = 256;
/// Open connections at once; beyond it new ones are closed at once, so a
/// flood of idle sockets cannot exhaust file descriptors.
const MAX_CONNECTIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(
        "could not listen on {addr}: {source}\nhint: is another server using that port? pick another with --listen"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {addr}: it is not a loopback address, and no access tokens are configured\nhint: add [auth] tokens with scopes \"ingest\" and \"query\", or listen on 127.0.0.1"
    )]
    NotLoopback { addr: SocketAddr },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
}

/// `[http.tls]` could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("could not load the TLS {what} {}: {detail}\nhint: http.tls wants PEM files: the certificate chain and its private key", path.display())]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    detail: String,
}

/// A running HTTP server.
pub struct Running {
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops accepting, finishes requests in flight, and returns.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .map_err(|e| ServeError::Http(std::io::Error::other(e)))?
    }
}

/// Loads `[http.tls]`: a rustls server config from PEM files.
fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds `listen` and serves the API of `node` until stopped.
///
/// The accept loop is hyper's, not `axum::serve`, for the limits a server on
/// a network needs: a client must send its request headers within
/// `http.header_timeout` (slow-loris clients are dropped, not kept forever),
/// and TLS when `[http.tls]` is set.
pub async fn start(node: &Node, listen: SocketAddr) -> Result<Running, ServeError> {
    let auth = Auth::from_config(&node.config.auth);
    if !listen.ip().is_loopback() && !auth.enabled() {
        return Err(ServeError::NotLoopback { addr: listen });
    }
    let http = &node.config.http;
    let tls = http.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let state = Arc::new(
        ApiState::new(
            node.ingest.clone(),
            node.config.ingest.max_body.as_u64() as usize,
            MAX_IN_FLIGHT,
            Some(node.layers()),
        )
        .with_auth(auth)
        .with_body_timeout(http.body_timeout),
    );
    let app = api::router(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let header_timeout = http.header_timeout;
    let (tx, mut rx) = oneshot::channel::<()>();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections; closing a new one");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(app.clone());
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        // The handshake gets the header timeout too.
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                        else {
                            tracing::debug!(%peer, "TLS handshake failed or timed out");
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
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
        stop: Some(tx),
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

/// `lambdaflow serve`: runs until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let listen = config.listen;
    let node = Node::open(config).await?;
    let server = start(&node, listen).await?;
    // A plain line on stdout that scripts and tests wait for.
    println!(
        "lambdaflow listening on {}://{} (data: {})",
        server.scheme,
        server.addr,
        node.data_dir().display()
    );
    tracing::info!(addr = %server.addr, data = %node.data_dir().display(), "serving");
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    server.stop().await?;
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
