//! Every metric the server emits, named in one place, and the Prometheus
//! recorder that `GET /metrics` renders.
//!
//! Metrics are counted in batches, never once per frame in a tight loop: the
//! hub adds its deliveries once per fan-out, the feed writer its frames and
//! bytes once per flush, the committer its posts once per batch. Without an
//! installed recorder every call is a cheap no-op, so library users and
//! benches pay nothing.
//!
//! One recorder serves the whole process ([`install`] is idempotent and
//! tolerates a recorder installed by someone else), because tests start many
//! servers in one process. The standard `process_*` figures (CPU seconds,
//! resident memory, open descriptors, threads) come from `metrics-process`
//! when rendered, plus the peak resident memory it lacks, so a load tester
//! can measure a server it did not start.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: QUIC connections accepted and not yet ended.
pub const CONNECTIONS_OPEN: &str = "herald_connections_open";
/// Counter: turns of each QUIC event loop (label `loop`).
pub const QUIC_LOOP_TURNS: &str = "herald_quic_loop_turns_total";
/// Counter: UDP datagrams each event loop received (label `loop`): with one
/// post per follower per ACK delay, about one ACK per delivery.
pub const QUIC_DATAGRAMS_IN: &str = "herald_quic_datagrams_received_total";
/// Counter: UDP datagrams each event loop sent (label `loop`).
pub const QUIC_DATAGRAMS_OUT: &str = "herald_quic_datagrams_sent_total";
/// Counter: `sendmmsg` (or `sendto`) calls of each event loop (label `loop`).
pub const QUIC_SEND_CALLS: &str = "herald_quic_send_calls_total";
/// Counter: live posts each event loop sent as QUIC DATAGRAM frames (label
/// `loop`; protocol §8.5).
pub const FEED_DATAGRAMS: &str = "herald_feed_datagrams_total";
/// Counter: Resend requests of followers with live datagrams (protocol §8.5).
pub const RESENDS: &str = "herald_resends_total";
/// Counter: Head frames written (protocol §8.5).
pub const HEADS: &str = "herald_heads_total";
/// Counter: handshakes by how they ended, label `result` = `ok` | `failed` |
/// `timed_out` | `retry` (sent a stateless Retry to validate the address) |
/// `refused` (over the per-address limit).
pub const HANDSHAKES: &str = "herald_handshakes_total";
/// Counter: sessions that said a valid Hello.
pub const SESSIONS: &str = "herald_sessions_total";
/// Gauge: sessions running now.
pub const SESSIONS_ACTIVE: &str = "herald_sessions_active";
/// Counter: accepted Follow requests.
pub const FOLLOWS: &str = "herald_follows_total";
/// Counter: posts committed (and handed to the fan-out).
pub const POSTS_PUBLISHED: &str = "herald_posts_published_total";
/// Counter: events queued on session outboxes by the fan-out.
pub const FANOUT_DELIVERIES: &str = "herald_fanout_deliveries_total";
/// Histogram: wall time of fanning one committed batch out, in seconds.
pub const FANOUT_SECONDS: &str = "herald_fanout_seconds";
/// Counter: feed frames written to followers (live and catch-up).
pub const FRAMES_DELIVERED: &str = "herald_frames_delivered_total";
/// Counter: feed bytes written to followers.
pub const BYTES_DELIVERED: &str = "herald_bytes_delivered_total";
/// Gauge: bytes of live events waiting in session outboxes.
pub const QUEUE_BYTES: &str = "herald_queue_bytes";
/// Counter: a session's queue overflowed for a channel (follower lagged).
pub const LAG_EVENTS: &str = "herald_lag_events_total";
/// Counter: catch-ups from the log (follow with history, gap, or lag).
pub const CATCHUPS: &str = "herald_catchups_total";
/// Histogram: durable commit of one batch of log operations, in seconds.
pub const COMMIT_SECONDS: &str = "herald_store_commit_seconds";
/// Histogram: operations per committed batch.
pub const COMMIT_BATCH_SIZE: &str = "herald_store_commit_batch_size";
/// Counter: stored records found damaged while being read (served as
/// `damaged` tombstones; run `herald check`).
pub const DAMAGED_RECORDS: &str = "herald_damaged_records_total";
/// Counter: HTTP connections answered 503 because the connection cap was reached.
pub const HTTP_REFUSED: &str = "herald_http_connections_refused_total";
/// Counter: idle HTTP connections closed to make room for a new one at the cap.
pub const HTTP_EVICTED: &str = "herald_http_connections_evicted_total";
/// CPU seconds (user + system) this process has used (from `metrics-process`,
/// with its other `process_*` figures).
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Resident memory now, in bytes (from `metrics-process`).
pub const PROCESS_RSS_BYTES: &str = "process_resident_memory_bytes";
/// Gauge: peak resident memory, in bytes.
pub const PROCESS_PEAK_RSS_BYTES: &str = "process_resident_memory_max_bytes";

/// Seconds buckets for fan-out and commit timings (10 us .. 10 s).
const SECONDS_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
/// Batch size buckets.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How often histogram storage is compacted when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. If a
/// different recorder was installed first, the handle renders only the
/// process figures; nothing fails.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Both bucket lists are non-empty constants, so this cannot fail;
            // fall back to summaries rather than panic if it ever did.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed; keeping it");
            }
            handle
        })
        .clone()
}

/// The exposition text, with the process figures refreshed first.
pub fn render(handle: &PrometheusHandle) -> String {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    let process = PROCESS.get_or_init(|| {
        let c = metrics_process::Collector::default();
        c.describe();
        c
    });
    process.collect();
    if let Some(peak) = peak_rss_bytes() {
        metrics::gauge!(PROCESS_PEAK_RSS_BYTES).set(peak as f64);
    }
    handle.render()
}

/// Peak resident memory of this process (VmHWM), which `metrics-process`
/// does not report; Linux only (`None` elsewhere).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_twice_and_render() {
        let a = install();
        let _b = install();
        metrics::counter!(POSTS_PUBLISHED).increment(1);
        let text = render(&a);
        assert!(text.contains(POSTS_PUBLISHED), "{text}");
        assert!(text.contains(PROCESS_CPU_SECONDS), "{text}");
        assert!(text.contains(PROCESS_RSS_BYTES), "{text}");
        assert!(text.contains(PROCESS_PEAK_RSS_BYTES), "{text}");
    }
}
