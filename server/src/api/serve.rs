//! Serving the API on a TCP listener, with the server's lifecycle: every
//! connection is a task on the server's [`TaskTracker`], so `Server::run`
//! knows when the last one is gone (and with it the last handle on the
//! databases). On `stop`, the listener closes and each connection finishes
//! its request in flight and closes (hyper's graceful shutdown); on `kill`
//! (the grace period is over) whatever is still running is dropped.
//!
//! The accept loop is written here rather than using `axum::serve` because
//! `axum::serve` detaches its connection tasks: they could outlive `run` and
//! keep the databases open. The connection itself is hyper's (HTTP/1.1),
//! with its header-read timeout; connections beyond
//! [`HttpLimits::max_connections`] get a `503` and are closed at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bounds of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this (also bounds how long an
    /// idle keep-alive connection is held).
    pub header_timeout: Duration,
}

/// The body answered to a connection over the cap.
const OVER_CAPACITY_BODY: &str = r#"{"error":{"code":"overloaded","message":"too many HTTP connections open; retry in a second"}}"#;

/// Accepts and serves connections until `stop`; see the module docs.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tasks: TaskTracker,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or a transient error: pause rather
                    // than spin, and keep serving the connections we have.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::HTTP_REFUSED).increment(1);
            tasks.spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let (stop, kill) = (stop.clone(), kill.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let service = TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = kill.cancelled() => return,
                    }
                }
                _ = kill.cancelled() => return,
            };
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// Answers a connection over the cap and closes it, without reading it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{OVER_CAPACITY_BODY}",
        OVER_CAPACITY_BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
