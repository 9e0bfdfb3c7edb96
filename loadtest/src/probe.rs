//! Reading the server's CPU seconds and resident memory: from
//! `/proc/<pid>` for a server this tool started (read here by hand: the
//! process-metrics crates report on their own process only), otherwise from
//! the `process_*` figures of its `/metrics`.

use herald_server::metrics::{PROCESS_CPU_SECONDS, PROCESS_PEAK_RSS_BYTES, PROCESS_RSS_BYTES};
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

/// The value of an unlabelled sample `name` in Prometheus exposition text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
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
        assert!(ProcessStats::read_pid(std::process::id()).is_some_and(|p| p.rss_bytes > 0));
    }

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
