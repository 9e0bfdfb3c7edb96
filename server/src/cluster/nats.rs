//! The NATS side: connecting to the cluster, the names of Herald's JetStream
//! resources, and the few raw JetStream requests this crate needs with typed
//! outcomes (async-nats folds some of them into `Other`).
//!
//! - [`Nats::publish`]: a JetStream publish with its ack parsed here, so the
//!   caller can tell "wrong last sequence" (someone else appended first), "busy"
//!   (another publish on the same subject, or with the same `Nats-Msg-Id`, is
//!   still being replicated), "unavailable" (timeout, no responders, no quorum:
//!   the publish may or may not have been stored) and real errors apart.
//! - [`Nats::leader_get`]: `STREAM.MSG.GET`, answered by the stream leader, so
//!   it sees every acknowledged message (read-your-writes).
//! - [`Nats::direct_batch`]: `DIRECT.GET` in batch or multi-last form, answered
//!   by any replica (cheap, but a replica may trail the leader: callers check
//!   what they get against what this node already knows, see `crate::store::jetstream`).

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

/// The default de-duplication window: 24 h, the embedded log's
/// idempotency TTL (`store::IDEMPOTENCY_TTL_MS`).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Connection and resource settings of the cluster backend.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Server URLs (`nats://host:port`), any of which may be down.
    pub urls: Vec<String>,
    /// Replicas of the stream and buckets (3 in production; 1..=5).
    pub replicas: usize,
    /// Prefix of every subject (`<prefix>.posts.<channel>`).
    pub subject_prefix: String,
    /// Prefix of every stream and bucket name (`<PREFIX>_POSTS`, `<prefix>_channels`).
    pub name_prefix: String,
    /// JetStream de-duplication window: how long an `Idempotency-Key` answers
    /// with its first post. Default: 24 h, the embedded log's TTL.
    pub duplicate_window: Duration,
    /// Timeout of one JetStream request.
    pub request_timeout: Duration,
    /// How long a write retries through leader elections and lost quorum
    /// before it fails with [`the store's `Storage` error`].
    pub write_deadline: Duration,
    /// This Herald node's id (impression leases, logs). Unique per node.
    pub node_id: String,
}

impl ClusterConfig {
    /// Settings for `herald serve --cluster nats://a:4222,nats://b:4222`.
    pub fn from_url_list(list: &str, node_id: &str) -> Result<ClusterConfig, NatsError> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err(NatsError::Config(
                "--cluster needs at least one nats:// URL".into(),
            ));
        }
        for u in &urls {
            if !(u.starts_with("nats://") || u.starts_with("tls://")) {
                return Err(NatsError::Config(format!(
                    "{u:?} is not a nats:// or tls:// URL"
                )));
            }
        }
        Ok(ClusterConfig {
            urls,
            replicas: 3,
            subject_prefix: "herald".into(),
            name_prefix: "HERALD".into(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            request_timeout: Duration::from_secs(5),
            write_deadline: Duration::from_secs(30),
            node_id: node_id.to_string(),
        })
    }

    /// Name of the posts stream.
    pub fn posts_stream(&self) -> String {
        format!("{}_POSTS", self.name_prefix)
    }

    /// Name of a KV bucket (`<prefix>_<what>`, lower case).
    pub fn bucket(&self, what: &str) -> String {
        format!("{}_{what}", self.name_prefix.to_lowercase())
    }
}

/// A NATS or JetStream operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NatsError {
    /// A setting is unusable (no URL, a URL that is not nats:// or tls://).
    #[error("cluster configuration: {0}")]
    Config(String),
    /// No server of the list could be reached.
    #[error("cannot connect to the cluster: {0}")]
    Connect(String),
    /// Timed out, no responders, no quorum: may succeed when retried.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// JetStream refused the request.
    #[error("jetstream error {code}: {description}")]
    Api {
        /// JetStream's error code (`err_code`, e.g. 10071).
        code: u64,
        /// Its description.
        description: String,
    },
    /// An answer Herald cannot read.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// How a JetStream publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubOutcome {
    /// Stored (and replicated) at `seq`; `duplicate` if an earlier message
    /// with the same `Nats-Msg-Id` within the window is at `seq`.
    Stored {
        /// The stream sequence.
        seq: u64,
        /// An earlier message with the same msg id answered.
        duplicate: bool,
    },
    /// `Nats-Expected-Last-Subject-Sequence` did not hold; the subject's last
    /// sequence, when the server said it.
    WrongLast(Option<u64>),
    /// Another publish to the subject (or with the msg id) is in flight.
    Busy,
}

/// JetStream API error codes used here (see nats-server `errors.json`).
pub mod codes {
    /// An expected last (subject) sequence did not hold.
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// Another publish to the subject with an expectation is in flight.
    pub const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;
    /// A publish with the same msg id is in flight.
    pub const DUPLICATE_IN_PROCESS: u64 = 10158;
    /// No message matches a get.
    pub const NO_MESSAGE_FOUND: u64 = 10037;
    /// No quorum / no leader right now.
    pub const CLUSTER_NOT_AVAILABLE: u64 = 10008;
    /// The stream does not exist.
    pub const STREAM_NOT_FOUND: u64 = 10059;
}

#[derive(Deserialize)]
struct ApiErr {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct AckOrErr {
    #[serde(default)]
    error: Option<ApiErr>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
}

/// One stored message, as returned by the get APIs.
#[derive(Debug, Clone)]
pub struct StoredMsg {
    /// Its subject.
    pub subject: String,
    /// Its stream sequence.
    pub seq: u64,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its payload.
    pub payload: Bytes,
}

impl StoredMsg {
    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

/// What a batch or multi-last direct get returned.
#[derive(Debug, Default)]
pub struct Batch {
    /// The messages, in stream order.
    pub msgs: Vec<StoredMsg>,
    /// Messages still matching after the last one returned (batch form).
    pub num_pending: Option<u64>,
    /// The answering replica's last stream sequence (multi-last form).
    pub up_to_seq: Option<u64>,
}

/// A connected client and JetStream context.
#[derive(Clone)]
pub struct Nats {
    /// The core NATS client (reconnects by itself).
    pub client: async_nats::Client,
    /// The JetStream context on it.
    pub js: jetstream::Context,
    /// The settings it was made with.
    pub cfg: ClusterConfig,
}

fn unavailable(e: impl std::fmt::Display) -> NatsError {
    NatsError::Unavailable(e.to_string())
}

/// Whether an API error means "try again later" rather than "no".
fn retryable_code(code: u64, http: u64) -> bool {
    code == codes::CLUSTER_NOT_AVAILABLE || http == 503 || http == 408
}

impl Nats {
    /// Connects to the cluster (retrying the first connect, reconnecting for ever).
    pub async fn connect(cfg: ClusterConfig) -> Result<Nats, NatsError> {
        let addrs: Vec<async_nats::ServerAddr> = cfg
            .urls
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| NatsError::Config(format!("{u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("herald-{}", cfg.node_id))
            .request_timeout(Some(cfg.request_timeout))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(addrs)
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.request_timeout);
        Ok(Nats { client, js, cfg })
    }

    /// Publishes to the posts stream and waits for the stream's ack (stored
    /// on a quorum of replicas).
    pub async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PubOutcome, NatsError> {
        let req = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.cfg.request_timeout));
        let msg = match self.client.send_request(subject, req).await {
            Ok(m) => m,
            Err(e) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::TimedOut
                    | async_nats::RequestErrorKind::NoResponders => unavailable(e),
                    _ => unavailable(e),
                })
            }
        };
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(unavailable("no responders"));
        }
        let a: AckOrErr = serde_json::from_slice(&msg.payload)
            .map_err(|e| NatsError::Protocol(format!("pub ack: {e}")))?;
        match a.error {
            None if a.seq > 0 => Ok(PubOutcome::Stored {
                seq: a.seq,
                duplicate: a.duplicate,
            }),
            None => Err(NatsError::Protocol("pub ack without seq".into())),
            Some(e) if e.err_code == codes::WRONG_LAST_SEQUENCE => {
                // "wrong last sequence: 42"
                let current = e
                    .description
                    .rsplit(':')
                    .next()
                    .and_then(|n| n.trim().parse().ok());
                Ok(PubOutcome::WrongLast(current))
            }
            Some(e)
                if e.err_code == codes::WRONG_LAST_SEQUENCE_CONSTANT
                    || e.err_code == codes::DUPLICATE_IN_PROCESS =>
            {
                Ok(PubOutcome::Busy)
            }
            Some(e) if retryable_code(e.err_code, e.code) => Err(NatsError::Unavailable(format!(
                "{} ({})",
                e.description, e.err_code
            ))),
            Some(e) => Err(NatsError::Api {
                code: e.err_code,
                description: e.description,
            }),
        }
    }

    /// `STREAM.MSG.GET` on `stream` (leader). `Ok(None)`: no such message.
    /// Retried through unavailability (a leader election) for a bounded time.
    pub async fn leader_get(
        &self,
        stream: &str,
        req: serde_json::Value,
    ) -> Result<Option<StoredMsg>, NatsError> {
        self.read_retrying(|| self.leader_get_once(stream, req.clone()))
            .await
    }

    /// Retries an idempotent read while it fails with [`NatsError::Unavailable`],
    /// for up to [`KV_RETRY_DEADLINE`].
    async fn read_retrying<T, F, Fut>(&self, mut op: F) -> Result<T, NatsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, NatsError>>,
    {
        let deadline = tokio::time::Instant::now() + KV_RETRY_DEADLINE;
        let mut backoff = Duration::from_millis(10);
        loop {
            match op().await {
                Err(NatsError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "retrying a read");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    async fn leader_get_once(
        &self,
        stream: &str,
        req: serde_json::Value,
    ) -> Result<Option<StoredMsg>, NatsError> {
        #[derive(Deserialize)]
        struct Raw {
            subject: String,
            seq: u64,
            #[serde(default)]
            hdrs: Option<String>,
            #[serde(default)]
            data: Option<String>,
        }
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            error: Option<ApiErr>,
            #[serde(default)]
            message: Option<Raw>,
        }
        let subject = format!("$JS.API.STREAM.MSG.GET.{stream}");
        let body = serde_json::to_vec(&req).map_err(|e| NatsError::Protocol(e.to_string()))?;
        let msg = self
            .client
            .request(subject, body.into())
            .await
            .map_err(unavailable)?;
        let r: Resp = serde_json::from_slice(&msg.payload)
            .map_err(|e| NatsError::Protocol(format!("msg get: {e}")))?;
        if let Some(e) = r.error {
            if e.err_code == codes::NO_MESSAGE_FOUND || e.code == 404 {
                return Ok(None);
            }
            if retryable_code(e.err_code, e.code) {
                return Err(NatsError::Unavailable(e.description));
            }
            return Err(NatsError::Api {
                code: e.err_code,
                description: e.description,
            });
        }
        let raw = r
            .message
            .ok_or_else(|| NatsError::Protocol("msg get without message".into()))?;
        let headers = match raw.hdrs {
            Some(h) if !h.is_empty() => parse_headers(&b64(&h)?)?,
            _ => HeaderMap::new(),
        };
        let payload = match raw.data {
            Some(d) => Bytes::from(b64(&d)?),
            None => Bytes::new(),
        };
        Ok(Some(StoredMsg {
            subject: raw.subject,
            seq: raw.seq,
            headers,
            payload,
        }))
    }

    /// A batch or multi-last `DIRECT.GET` on `stream`: collects the replies
    /// until the end-of-batch status, bounded by `max_msgs` and the request
    /// timeout. A 404 is an empty batch. Retried like [`Nats::leader_get`].
    pub async fn direct_batch(
        &self,
        stream: &str,
        req: serde_json::Value,
        max_msgs: usize,
    ) -> Result<Batch, NatsError> {
        self.read_retrying(|| self.direct_batch_once(stream, req.clone(), max_msgs))
            .await
    }

    async fn direct_batch_once(
        &self,
        stream: &str,
        req: serde_json::Value,
        max_msgs: usize,
    ) -> Result<Batch, NatsError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(unavailable)?;
        let body = serde_json::to_vec(&req).map_err(|e| NatsError::Protocol(e.to_string()))?;
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
            .await
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        let mut out = Batch::default();
        loop {
            let next = tokio::time::timeout_at(deadline, sub.next())
                .await
                .map_err(|_| NatsError::Unavailable("direct get timed out".into()))?;
            let Some(m) = next else {
                return Err(NatsError::Unavailable(
                    "direct get subscription closed".into(),
                ));
            };
            let status = m.status.map(|s| s.as_u16());
            let hdr_u64 = |h: &Option<HeaderMap>, name: &str| -> Option<u64> {
                h.as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.as_str().parse().ok())
            };
            match status {
                Some(204) => {
                    out.num_pending = hdr_u64(&m.headers, "Nats-Num-Pending");
                    out.up_to_seq = hdr_u64(&m.headers, "Nats-UpTo-Sequence");
                    break;
                }
                Some(404) => break,
                Some(503) => return Err(unavailable("no responders (direct get)")),
                Some(code) if code != 200 => {
                    return Err(NatsError::Api {
                        code: u64::from(code),
                        description: m.description.unwrap_or_default(),
                    })
                }
                _ => {}
            }
            let headers = m.headers.unwrap_or_default();
            let subject = headers
                .get("Nats-Subject")
                .map(|v| v.as_str().to_string())
                .ok_or_else(|| {
                    NatsError::Protocol("direct get reply without Nats-Subject".into())
                })?;
            let seq = headers
                .get("Nats-Sequence")
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| {
                    NatsError::Protocol("direct get reply without Nats-Sequence".into())
                })?;
            out.msgs.push(StoredMsg {
                subject,
                seq,
                headers,
                payload: m.payload,
            });
            if out.msgs.len() > max_msgs {
                return Err(NatsError::Protocol(format!(
                    "direct get sent more than the {max_msgs} messages asked for"
                )));
            }
        }
        let _ = sub.unsubscribe().await;
        Ok(out)
    }

    /// `STREAM.PURGE` of `filter` below stream sequence `below_seq`.
    pub async fn purge_below(
        &self,
        stream: &str,
        filter: &str,
        below_seq: u64,
    ) -> Result<u64, NatsError> {
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            error: Option<ApiErr>,
            #[serde(default)]
            purged: u64,
        }
        let body = serde_json::json!({ "filter": filter, "seq": below_seq });
        let msg = self
            .client
            .request(
                format!("$JS.API.STREAM.PURGE.{stream}"),
                serde_json::to_vec(&body)
                    .map_err(|e| NatsError::Protocol(e.to_string()))?
                    .into(),
            )
            .await
            .map_err(unavailable)?;
        let r: Resp = serde_json::from_slice(&msg.payload)
            .map_err(|e| NatsError::Protocol(format!("purge: {e}")))?;
        match r.error {
            None => Ok(r.purged),
            Some(e) if retryable_code(e.err_code, e.code) => {
                Err(NatsError::Unavailable(e.description))
            }
            Some(e) => Err(NatsError::Api {
                code: e.err_code,
                description: e.description,
            }),
        }
    }
}

fn b64(s: &str) -> Result<Vec<u8>, NatsError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| NatsError::Protocol(format!("base64: {e}")))
}

/// Parses a `NATS/1.0` header block (from `STREAM.MSG.GET`).
fn parse_headers(raw: &[u8]) -> Result<HeaderMap, NatsError> {
    let text =
        std::str::from_utf8(raw).map_err(|e| NatsError::Protocol(format!("headers: {e}")))?;
    let mut map = HeaderMap::new();
    let mut lines = text.split("\r\n");
    match lines.next() {
        Some(first) if first.starts_with("NATS/1.0") => {}
        _ => return Err(NatsError::Protocol("headers without NATS/1.0".into())),
    }
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            map.append(k.trim(), v.trim());
        }
    }
    Ok(map)
}

/// Whether a KV write failed only because another write got there first:
/// the revision moved (10071), or another write of the key is still being
/// replicated (10164, which async-nats reports as `Other`). Such a write is
/// re-read and retried.
pub fn is_kv_conflict(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            let c = js.error_code().0;
            if c == codes::WRONG_LAST_SEQUENCE || c == codes::WRONG_LAST_SEQUENCE_CONSTANT {
                return true;
            }
        }
        let text = err.to_string();
        if text.contains("10071") || text.contains("10164") || text.contains("wrong last sequence")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// How long KV operations retry through a missing stream leader (a bucket
/// just created, a leader election).
pub const KV_RETRY_DEADLINE: Duration = Duration::from_secs(15);

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        out.push_str(&err.to_string());
        out.push('|');
        cur = err.source();
    }
    out.to_lowercase()
}

/// Nobody received the request (no stream leader or replica subscribed yet):
/// nothing happened, so any request may be sent again.
pub fn is_no_responders(e: &(dyn std::error::Error + 'static)) -> bool {
    let t = error_text(e);
    t.contains("no responders") || t.contains("10008")
}

/// A failure that may pass: no responders, a timeout, no quorum. Only reads
/// are retried on timeouts (a timed-out write may have happened).
pub fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let t = error_text(e);
    is_no_responders(e)
        || t.contains("timed out")
        || t.contains("timeout")
        || t.contains("temporarily unavailable")
}

/// Runs `op` until it succeeds, fails for good (`retry` says no), or
/// [`KV_RETRY_DEADLINE`] passes.
pub async fn retrying<T, E, F, Fut>(
    retry: fn(&(dyn std::error::Error + 'static)) -> bool,
    mut op: F,
) -> Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + KV_RETRY_DEADLINE;
    let mut backoff = Duration::from_millis(10);
    loop {
        match op().await {
            Err(e) if retry(&e) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "retrying a kv operation");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_and_headers_parse() {
        let c = ClusterConfig::from_url_list("nats://a:1, nats://b:2,", "n").unwrap();
        assert_eq!(c.urls, vec!["nats://a:1", "nats://b:2"]);
        assert!(ClusterConfig::from_url_list("", "n").is_err());
        assert!(ClusterConfig::from_url_list("http://x", "n").is_err());
        let h = parse_headers(b"NATS/1.0\r\nHerald-Seq: 7\r\nNats-Msg-Id: x\r\n\r\n").unwrap();
        assert_eq!(h.get("Herald-Seq").map(|v| v.as_str()), Some("7"));
        assert!(parse_headers(b"HTTP/1.1\r\n").is_err());
    }
}
