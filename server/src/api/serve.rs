//! Serving the API on a TCP listener, with the server's lifecycle: every
//! connection is a task on the server's [`TaskTracker`], so `Server::run`
//! knows when the last one is gone (and with it the last handle on the
//! databases). On `stop`, the listener closes and each connection finishes
//! its request in flight and closes (hyper's graceful shutdown); on `kill`
//! (the grace period is over) whatever is still running is dropped.
//!
//! The accept loop is written here rather than using `axum::serve` because
//! `axum::serve` detaches its connection tasks: they could outlive `run` and
//! keep the databases open. The connection itself is hyper's (HTTP/1.1).
//!
//! # Bounds: what a client that sends nothing, or sends slowly, can hold
//!
//! - **Headers** must arrive within [`HttpLimits::header_timeout`] of the
//!   connection opening or of the previous answer (hyper's header-read
//!   timeout, which starts as soon as hyper waits for a request head: it
//!   covers a connection that never sends a byte, one that trickles its
//!   headers, and an idle keep-alive connection alike). The connection is
//!   then closed.
//! - **A request** (reading its body, and answering) must finish within
//!   [`HttpLimits::request_timeout`] (tower's timeout around the router), or
//!   it is answered `408` `request_timeout` and the connection closes: a body
//!   trickled a byte at a time cannot hold a connection for longer.
//! - **Connections** are capped at [`HttpLimits::max_connections`]. At the
//!   cap, a new connection first takes the place of the connection that has
//!   been idle longest (no request in flight: never sent one, or between two
//!   keep-alive requests), which is closed; nothing in flight is lost, and
//!   strangers holding idle connections cannot keep a real client out. Only
//!   when every connection has a request in flight is the new one answered
//!   `503` `overloaded` and closed at once, without being read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Bounds of the HTTP server; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; at the cap the longest-idle connection
    /// gives way, and if none is idle the new one is answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this (also bounds how long an
    /// idle keep-alive connection is held).
    pub header_timeout: Duration,
    /// A request's body must arrive and its answer be ready within this.
    pub request_timeout: Duration,
}

/// The body answered to a connection over the cap.
const OVER_CAPACITY_BODY: &str = r#"{"error":{"code":"overloaded","message":"too many HTTP requests in flight; retry in a second"}}"#;

/// How long a new connection at the cap waits for the evicted idle
/// connection to let go of its place.
const EVICTION_WAIT: Duration = Duration::from_millis(500);

/// The open connections, and which of them are idle, so that at the cap the
/// longest-idle one can be asked to give way. One entry per open connection
/// (bounded by the cap).
#[derive(Default)]
struct Connections {
    next_id: std::sync::atomic::AtomicU64,
    open: Mutex<HashMap<u64, ConnEntry>>,
}

struct ConnEntry {
    /// Requests in flight (their answer not yet fully written).
    in_flight: usize,
    /// Since when the connection has had nothing in flight.
    idle_since: Instant,
    /// Cancelled to make the connection give way.
    evict: CancellationToken,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new (idle) connection.
    fn register(self: &Arc<Self>) -> Registered {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.lock().insert(
            id,
            ConnEntry {
                in_flight: 0,
                idle_since: Instant::now(),
                evict: evict.clone(),
            },
        );
        Registered {
            conns: self.clone(),
            id,
            evict,
        }
    }

    /// Asks the connection idle for longest to close; `false` if none is idle.
    fn evict_longest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .filter(|e| e.in_flight == 0 && !e.evict.is_cancelled())
            .min_by_key(|e| e.idle_since);
        match victim {
            Some(e) => {
                e.evict.cancel();
                true
            }
            None => false,
        }
    }

    fn request_started(&self, id: u64) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.in_flight += 1;
        }
    }

    fn request_finished(&self, id: u64) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if e.in_flight == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

/// A connection's entry in [`Connections`]; removed on drop.
struct Registered {
    conns: Arc<Connections>,
    id: u64,
    evict: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

/// Marks a request in flight until dropped (with the answer's body, once it
/// is written or abandoned).
struct InFlight {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conns.request_finished(self.id);
    }
}

/// Accepts and serves connections until `stop`; see the module docs.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tasks: TaskTracker,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let router = router.layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                |e: tower::BoxError| async move { request_timed_out(e) },
            ))
            .timeout(limits.request_timeout),
    );
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = Arc::new(Connections::default());
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
        let Some(permit) = place_for(&permits, &conns).await else {
            metrics::counter!(crate::metrics::HTTP_REFUSED).increment(1);
            tasks.spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let registered = conns.register();
        let router = router.clone();
        let (stop, kill) = (stop.clone(), kill.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let evict = registered.evict.clone();
            let (conns, id) = (registered.conns.clone(), registered.id);
            let _registered = registered;
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                conns.request_started(id);
                let in_flight = InFlight {
                    conns: conns.clone(),
                    id,
                };
                let router = router.clone();
                async move {
                    let resp = match router.oneshot(req.map(Body::new)).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    // The request stays in flight until its answer's body is
                    // written (or dropped with the connection).
                    Ok::<_, Infallible>(resp.map(|body| {
                        Body::new(body.map_err(move |e| {
                            let _still_in_flight = &in_flight;
                            e
                        }))
                    }))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                _ = evict.cancelled() => {
                    // Idle (nothing in flight): dropping it loses nothing.
                    metrics::counter!(crate::metrics::HTTP_EVICTED).increment(1);
                    return;
                }
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

/// A place for a new connection: a free one, or the place of the connection
/// idle for longest, which is asked to give way; `None` when every
/// connection has a request in flight.
async fn place_for(permits: &Arc<Semaphore>, conns: &Connections) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    if !conns.evict_longest_idle() {
        return None;
    }
    tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
}

/// The answer to a request that outlived the request timeout (the only
/// error the timeout layer makes); the connection is closed after it, since
/// the rest of a trickled body may still be on its way.
fn request_timed_out(e: tower::BoxError) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut resp = super::ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        herald_proto::ErrorCode::RequestTimeout,
        format!("the request took too long (its body must arrive and its answer be ready within the server's request timeout): {e}"),
    )
    .into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
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
