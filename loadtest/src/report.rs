//! The result of a run: what was measured and the verdict, as JSON
//! (`--json FILE`) and as the summary table printed at the end.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::verify::Verdict;
use crate::Options;

/// Everything a run found. See the field docs for units.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub options: Options,
    pub server: ServerInfo,
    pub connect: ConnectReport,
    pub publish: PublishReport,
    pub delivery: DeliveryReport,
    /// Server figures; with several nodes, the totals over all of them.
    pub server_stats: ServerStats,
    /// Per node (one entry for a single server).
    pub nodes: Vec<NodeReport>,
    /// With `--campaign`: the promoted-post accounting check.
    pub campaign: Option<crate::campaign::CampaignReport>,
    pub verify: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub quic: String,
    pub api: String,
    /// Where CPU and memory figures come from: `/proc`, `/metrics` or `none`.
    pub probe: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub followers: u64,
    pub connected: u64,
    pub failed: u64,
    /// From the first connect to the last follower following its channels.
    pub wall_secs: f64,
    pub per_sec: f64,
    /// Per follower: handshake, Hello/Welcome and its follows, in milliseconds.
    pub time_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    pub posts: u64,
    pub ok: u64,
    pub failed: u64,
    pub wall_secs: f64,
    /// Send to answer (durable) per acknowledged post.
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    /// Deliveries expected (connected followers x posts of their channels).
    pub expected: u64,
    pub delivered: u64,
    /// Whether every expected delivery arrived before the timeout.
    pub completed: bool,
    /// From the first publish to the last delivery.
    pub wall_secs: f64,
    pub per_sec: f64,
    /// Publish (request sent) to delivery (post decoded by the follower), ms.
    pub latency_ms: Percentiles,
    /// Per post, publish to arrival at its last follower, ms.
    pub last_follower_ms: Percentiles,
    /// How the tallied posts came (`--engine loop`; the `client` engine
    /// counts none): as QUIC datagrams, on the feed stream.
    pub datagram_posts: u64,
    pub stream_posts: u64,
    /// Resend requests the followers sent for missed datagrams.
    pub resends: u64,
    /// Datagrams dropped on purpose by `--drop-datagrams-every`.
    pub datagrams_dropped: u64,
}

/// One node's share of a run against several nodes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeReport {
    pub quic: String,
    pub api: String,
    /// Followers that connected to it first.
    pub followers: u64,
    /// Posts those followers received.
    pub delivered: u64,
    /// Its CPU from the first publish to the last delivery.
    pub run_cpu_seconds: Option<f64>,
    pub deliveries_per_cpu_second: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerStats {
    pub source: String,
    /// Server CPU while the followers idled, in percent of one core.
    pub idle_cpu_percent: Option<f64>,
    /// Server CPU from the first publish to the last delivery.
    pub run_cpu_seconds: Option<f64>,
    pub deliveries_per_cpu_second: Option<f64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_connected_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory growth per connected, idle follower.
    pub bytes_per_idle_follower: Option<f64>,
}

impl Report {
    /// The process exit code for this report: 0 when it verified clean, 1
    /// when any delivery was wrong or missing.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.verify.ok)
    }
}

/// Latency-style percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_us(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// A histogram for microsecond values up to an hour, 3 significant digits.
pub fn us_histogram() -> Histogram<u64> {
    // Constant, valid bounds (low >= 1, high >= 2 * low, sigfig <= 5): cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid constant histogram bounds")
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| v.to_string())
}

fn mib(b: Option<u64>) -> String {
    opt(b.map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))))
}

fn pct(p: &Percentiles) -> String {
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        p.p50, p.p90, p.p99, p.p999, p.max
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let s = &self.server_stats;
        let rows: Vec<(&str, String)> = vec![
            ("server", format!("quic {}  http {}  (figures from {})", self.server.quic, self.server.api, self.server.probe)),
            ("load", format!(
                "{} followers over {} endpoints, {} channels (zipf {}), {} follows each, {} posts of {} B at {}",
                o.followers, o.endpoints, o.channels, o.zipf, o.follows, o.posts, o.size,
                if o.rate > 0.0 { format!("{}/s", o.rate) } else { "burst".into() }
            )),
            ("connected", format!(
                "{} of {} in {:.2} s ({:.0}/s), {} failed",
                self.connect.connected, self.connect.followers, self.connect.wall_secs,
                self.connect.per_sec, self.connect.failed
            )),
            ("connect time ms", pct(&self.connect.time_ms)),
            ("published", format!(
                "{} ok, {} failed in {:.2} s",
                self.publish.ok, self.publish.failed, self.publish.wall_secs
            )),
            ("publish latency ms", pct(&self.publish.latency_ms)),
            ("delivered", format!(
                "{} of {} in {:.3} s = {:.0}/s{}",
                self.delivery.delivered, self.delivery.expected, self.delivery.wall_secs,
                self.delivery.per_sec,
                if self.delivery.completed { "" } else { "  (TIMED OUT)" }
            )),
            ("latency ms", pct(&self.delivery.latency_ms)),
            ("to last follower ms", pct(&self.delivery.last_follower_ms)),
            ("live datagrams", if !o.live_datagrams {
                "off".to_string()
            } else if o.engine == crate::options::Engine::Client {
                format!("on: {} resends (the client engine does not count posts by path)", self.delivery.resends)
            } else {
                let d = &self.delivery;
                format!(
                    "{} posts by datagram, {} by stream, {} resends, {} datagrams dropped by the test knob",
                    d.datagram_posts, d.stream_posts, d.resends, d.datagrams_dropped
                )
            }),
            ("server CPU (run)", format!(
                "{} s, {} deliveries per CPU-second",
                opt(s.run_cpu_seconds.map(|c| format!("{c:.2}"))),
                opt(s.deliveries_per_cpu_second.map(|d| format!("{d:.0}")))
            )),
            ("server CPU (idle)", format!("{} % of a core", opt(s.idle_cpu_percent.map(|c| format!("{c:.1}"))))),
            ("server RSS", format!(
                "before {}  connected {}  peak {}",
                mib(s.rss_before_bytes), mib(s.rss_connected_bytes), mib(s.peak_rss_bytes)
            )),
            ("campaign", match &self.campaign {
                Some(c) => format!("{}: {} impressions counted, {} promoted frames received", c.id, c.impressions, c.received),
                None => "-".to_string(),
            }),
            ("per idle follower", opt(s.bytes_per_idle_follower.map(|b| format!("{:.1} KiB", b / 1024.0)))),
            ("verify", if self.verify.ok { "OK: every follower got every post of its channels once, in order".to_string() } else {
                let v = &self.verify;
                format!(
                    "FAILED: {} missing ({} skipped), {} incomplete follows, {} out of order, {} duplicates, {} unexpected, {} resets, {} errors, {} connect failures, {} closed early, {} publish failures",
                    v.missing, v.gaps, v.incomplete, v.out_of_order, v.duplicates, v.unexpected,
                    v.resets, v.errors, v.connect_failures, v.closed_early, v.publish_failures
                )
            }),
        ];
        for (k, v) in rows {
            writeln!(f, "{k:>20}  {v}")?;
        }
        if self.nodes.len() > 1 {
            for n in &self.nodes {
                writeln!(
                    f,
                    "{:>20}  {} followers, {} delivered, CPU {} s, {} deliveries per CPU-second, peak RSS {}",
                    format!("node {}", n.quic),
                    n.followers,
                    n.delivered,
                    opt(n.run_cpu_seconds.map(|c| format!("{c:.2}"))),
                    opt(n.deliveries_per_cpu_second.map(|d| format!("{d:.0}"))),
                    mib(n.peak_rss_bytes)
                )?;
            }
        }
        for e in &self.verify.examples {
            writeln!(f, "{:>20}  {e}", "")?;
        }
        Ok(())
    }
}
