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
//! servers in one process. Process CPU seconds and resident memory (current
//! and peak) are read from `/proc/self` when rendered, so a load tester can
//! measure a server it did not start.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: QUIC connections accepted and not yet ended.
pub const CONNECTIONS_OPEN: &str = "herald_connections_open";
/// Counter: finished handshakes, label `result` = `ok` | `failed`.
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
/// Counter: HTTP connections answered 503 because the connection cap was reached.
pub const HTTP_REFUSED: &str = "herald_http_connections_refused_total";
/// Gauge: CPU seconds (user + system) this process has used.
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Gauge: resident memory now, in bytes.
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
    if let Some(p) = ProcessStats::read_self() {
        metrics::gauge!(PROCESS_CPU_SECONDS).set(p.cpu_seconds);
        metrics::gauge!(PROCESS_RSS_BYTES).set(p.rss_bytes as f64);
        metrics::gauge!(PROCESS_PEAK_RSS_BYTES).set(p.peak_rss_bytes as f64);
    }
    handle.render()
}

/// CPU and memory of a process, from `/proc` (Linux only).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    /// Resident set size now (VmRSS).
    pub rss_bytes: u64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_bytes: u64,
}

impl ProcessStats {
    /// This process.
    pub fn read_self() -> Option<ProcessStats> {
        Self::read("self")
    }

    /// Process `pid`.
    pub fn read_pid(pid: u32) -> Option<ProcessStats> {
        Self::read(&pid.to_string())
    }

    fn read(which: &str) -> Option<ProcessStats> {
        let stat = std::fs::read_to_string(format!("/proc/{which}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{which}/status")).ok()?;
        Some(ProcessStats {
            cpu_seconds: cpu_seconds_from_stat(&stat)?,
            rss_bytes: status_kib(&status, "VmRSS:")? * 1024,
            peak_rss_bytes: status_kib(&status, "VmHWM:")? * 1024,
        })
    }
}

/// utime + stime from a `/proc/<pid>/stat` line, assuming 100 clock ticks/s
/// (the value on every Linux platform Rust supports without libc lookups).
fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may contain spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come state (field 3) ... utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_status() {
        let stat = "123 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.0));
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(status, "VmHWM:"), Some(2048));
    }

    #[test]
    fn install_twice_and_render() {
        let a = install();
        let _b = install();
        metrics::counter!(POSTS_PUBLISHED).increment(1);
        let text = render(&a);
        assert!(text.contains(POSTS_PUBLISHED), "{text}");
    }
}
