//! `lambdaflow serve`: the HTTP server in front of a [`Node`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::config::{Config, ConfigError};
pub use crate::node::{Node, NodeError};

/// Ingest requests whose bodies may be in memory at once.
const MAX_IN_FLIGHT: usize = 256;

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
        "refusing to listen on {addr}: it is not a loopback address and this build has no access tokens yet\nhint: listen on 127.0.0.1 and put a proxy with authentication in front"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
}

/// A running HTTP server.
pub struct Running {
    pub addr: SocketAddr,
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

/// Binds `listen` and serves the API of `node` until stopped.
pub async fn start(node: &Node, listen: SocketAddr) -> Result<Running, ServeError> {
    if !listen.ip().is_loopback() {
        return Err(ServeError::NotLoopback { addr: listen });
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let state = Arc::new(ApiState::new(
        node.ingest.clone(),
        node.config.ingest.max_body.as_u64() as usize,
        MAX_IN_FLIGHT,
        Some(node.layers()),
    ));
    let app = api::router(state);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .map_err(ServeError::Http)
    });
    Ok(Running {
        addr,
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
        "lambdaflow listening on http://{} (data: {})",
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
