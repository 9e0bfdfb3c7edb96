//! Reading the server's CPU seconds and resident memory: from
//! `/proc/<pid>` for a server this tool started, otherwise from the
//! `process_*` gauges of its `/metrics`.

use herald_server::metrics::{
    ProcessStats, PROCESS_CPU_SECONDS, PROCESS_PEAK_RSS_BYTES, PROCESS_RSS_BYTES,
};
use serde::Serialize;

/// Where server figures come from.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A local process.
    Pid(u32),
    /// A Prometheus endpoint (`http://host:port/metrics`).
    Metrics(String),
    /// Not measured.
    None,
}

impl Probe {
    /// Names the source, for the report.
    pub fn source(&self) -> &'static str {
        match self {
            Probe::Pid(_) => "/proc",
            Probe::Metrics(_) => "/metrics",
            Probe::None => "none",
        }
    }

    /// Reads the figures now; `None` if they cannot be read.
    pub async fn read(&self, http: &reqwest::Client) -> Option<Sample> {
        match self {
            Probe::Pid(pid) => ProcessStats::read_pid(*pid).map(Sample::from),
            Probe::Metrics(url) => {
                let text = http.get(url).send().await.ok()?.text().await.ok()?;
                Some(Sample {
                    cpu_seconds: gauge(&text, PROCESS_CPU_SECONDS)?,
                    rss_bytes: gauge(&text, PROCESS_RSS_BYTES)? as u64,
                    peak_rss_bytes: gauge(&text, PROCESS_PEAK_RSS_BYTES)? as u64,
                })
            }
            Probe::None => None,
        }
    }
}

/// One reading.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl From<ProcessStats> for Sample {
    fn from(p: ProcessStats) -> Sample {
        Sample {
            cpu_seconds: p.cpu_seconds,
            rss_bytes: p.rss_bytes,
            peak_rss_bytes: p.peak_rss_bytes,
        }
    }
}

/// The value of an unlabelled sample `name` in Prometheus exposition text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_gauges() {
        let text = "# TYPE process_cpu_seconds_total gauge\nprocess_cpu_seconds_total 1.5\nprocess_resident_memory_bytes 2048\n";
        assert_eq!(super::gauge(text, "process_cpu_seconds_total"), Some(1.5));
        assert_eq!(
            super::gauge(text, "process_resident_memory_bytes"),
            Some(2048.0)
        );
        assert_eq!(super::gauge(text, "nope"), None);
    }
}
