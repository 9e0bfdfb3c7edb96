//! `--soak MINUTES`: a long run that looks for slow leaks rather than peak
//! throughput. Followers come and go (each lives a random 10 to 60 seconds,
//! then leaves and a new one takes its place), posts flow at `--rate` per
//! second over `--channels`, and a share of the followers stall (stop
//! reading their events for a while, so the server lags them and catches
//! them up later). Every `--soak-sample-secs` the server's resident memory
//! and CPU are sampled; the report is that curve, plus the delivery
//! verdict: no follower may see a gap (the client library counts them) and
//! no follower task may fail.
//!
//! Memory held here: one client per follower slot (bounded by
//! `--followers`), the samples (one per interval).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::{Client, ClientOptions, Event};
use herald_server::auth::TokenIssuer;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{LoadError, Options, Target};

/// The soak's knobs beyond [`Options`].
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SoakOptions {
    /// Run a soak of this many minutes instead of a measurement run.
    #[arg(long, value_name = "MINUTES")]
    pub soak: Option<f64>,
    /// Seconds between two samples of the server's memory and CPU.
    #[arg(long, default_value_t = 10.0)]
    pub soak_sample_secs: f64,
    /// Percent of followers that stall (stop reading for 5 to 20 s).
    #[arg(long, default_value_t = 10)]
    pub soak_stall_percent: u32,
}

/// One sample of the soak.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    /// Seconds since the start.
    pub at_secs: f64,
    /// Server resident memory, MiB.
    pub rss_mib: f64,
    /// Server CPU since the previous sample, percent of one core.
    pub cpu_percent: f64,
    /// Followers connected now.
    pub followers: u64,
    /// Posts published so far.
    pub posts: u64,
    /// Posts delivered to followers so far.
    pub delivered: u64,
}

/// What a soak found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub minutes: f64,
    pub samples: Vec<SoakSample>,
    /// Followers that came and went.
    pub sessions: u64,
    pub posts: u64,
    pub delivered: u64,
    /// Gaps seen by followers (must be 0).
    pub gaps: u64,
    /// Follower sessions that failed (connect or follow refused).
    pub failures: u64,
    /// RSS after warm-up (the first fifth of the run): min and max, MiB.
    pub rss_after_warmup_mib: (f64, f64),
}

impl SoakReport {
    /// 0 when clean, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.gaps > 0 || self.failures > 0)
    }
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "soak: {:.1} minutes", self.minutes)?;
        writeln!(
            f,
            "{:>8} {:>9} {:>7} {:>9} {:>8} {:>10}",
            "t (s)", "RSS MiB", "CPU %", "followers", "posts", "delivered"
        )?;
        for s in &self.samples {
            writeln!(
                f,
                "{:>8.0} {:>9.1} {:>7.1} {:>9} {:>8} {:>10}",
                s.at_secs, s.rss_mib, s.cpu_percent, s.followers, s.posts, s.delivered
            )?;
        }
        writeln!(
            f,
            "sessions {}, posts {}, delivered {}, gaps {}, failures {}",
            self.sessions, self.posts, self.delivered, self.gaps, self.failures
        )?;
        writeln!(
            f,
            "RSS after warm-up: {:.1} to {:.1} MiB",
            self.rss_after_warmup_mib.0, self.rss_after_warmup_mib.1
        )?;
        write!(
            f,
            "{}",
            if self.exit_code() == 0 {
                "OK"
            } else {
                "FAILED: gaps or failed sessions"
            }
        )
    }
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    sessions: AtomicU64,
    posts: AtomicU64,
    delivered: AtomicU64,
    gaps: AtomicU64,
    failures: AtomicU64,
}

/// Runs the soak against `target`.
pub async fn run(
    opts: &Options,
    soak: &SoakOptions,
    target: &Target,
) -> Result<SoakReport, LoadError> {
    let minutes = soak.soak.unwrap_or(1.0).max(0.05);
    let total = Duration::from_secs_f64(minutes * 60.0);
    let api = herald::cli::ApiClient::new(&target.api, target.admin_key.clone());
    let channels: Vec<String> = (0..opts.channels).map(|i| format!("soak-{i}")).collect();
    for c in &channels {
        if let Err(e) = api.create_channel(c, "soak").await {
            // An earlier soak against the same server made it already.
            if api.channel(c).await.is_err() {
                return Err(e.into());
            }
        }
    }
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let issuer = TokenIssuer::hs256(target.jwt_secret.as_bytes());
    let mut base_opts = ClientOptions::new(target.quic, target.trust.clone(), String::new());
    // As in a run: many handshakes at once on shared cores (see its use there).
    base_opts.connect_timeout = crate::run::CONNECT_TIMEOUT;
    base_opts.live_datagrams = opts.live_datagrams;
    let endpoints: Vec<quinn::Endpoint> = (0..opts.endpoints.max(1))
        .map(|_| herald_client::shared_endpoint(&base_opts))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();

    // Followers: each slot runs one follower after another.
    let mut tasks = Vec::new();
    for slot in 0..opts.followers {
        let (counters, stop, channels) = (counters.clone(), stop.clone(), channels.clone());
        let endpoint = endpoints[slot % endpoints.len()].clone();
        let issuer = issuer.clone();
        let base = base_opts.clone();
        let (follows, stall_pct, seed) = (opts.follows, soak.soak_stall_percent, opts.seed);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (slot as u64) << 20);
            // Spread the first connects over a few seconds.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5000))).await;
            let mut generation = 0u64;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                let user = format!("soak-{slot}-{generation}");
                let Ok(token) = issuer.mint(&user, Duration::from_secs(24 * 3600)) else {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut o = base.clone();
                o.token = token;
                let lifetime = Duration::from_secs(rng.random_range(10..=60));
                let stalls = rng.random_range(0..100) < stall_pct;
                let picks: Vec<String> = (0..follows.min(channels.len()))
                    .map(|_| channels[rng.random_range(0..channels.len())].clone())
                    .collect();
                match follower_life(&endpoint, o, &picks, lifetime, stalls, &counters, &stop).await
                {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "soak follower failed");
                        counters.failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }

    // Posts, at the rate, round robin over the channels.
    let publisher = {
        let (api, counters, stop, channels) = (
            api.clone(),
            counters.clone(),
            stop.clone(),
            channels.clone(),
        );
        let rate = if opts.rate > 0.0 { opts.rate } else { 10.0 };
        let text = "x".repeat(opts.size.max(8));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if api
                    .publish(&channels[i % channels.len()], &text)
                    .await
                    .is_ok()
                {
                    counters.posts.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };

    // Samples.
    let http = reqwest::Client::new();
    let every = Duration::from_secs_f64(soak.soak_sample_secs.max(1.0));
    let mut samples = Vec::new();
    let mut last = target.probe.read(&http).await;
    let mut last_at = Instant::now();
    while started.elapsed() < total {
        tokio::time::sleep(every.min(total.saturating_sub(started.elapsed()))).await;
        let now = target.probe.read(&http).await;
        let dt = last_at.elapsed().as_secs_f64();
        last_at = Instant::now();
        let sample = SoakSample {
            at_secs: started.elapsed().as_secs_f64(),
            rss_mib: now.map_or(0.0, |s| s.rss_bytes as f64 / 1048576.0),
            cpu_percent: match (last, now) {
                (Some(a), Some(b)) if dt > 0.0 => (b.cpu_seconds - a.cpu_seconds) / dt * 100.0,
                _ => 0.0,
            },
            followers: counters.connected.load(Ordering::Relaxed),
            posts: counters.posts.load(Ordering::Relaxed),
            delivered: counters.delivered.load(Ordering::Relaxed),
        };
        if !opts.quiet {
            eprintln!(
                "soak {:>6.0}s  RSS {:>8.1} MiB  CPU {:>5.1} %  followers {:>6}  posts {:>7}  delivered {:>9}",
                sample.at_secs, sample.rss_mib, sample.cpu_percent, sample.followers, sample.posts, sample.delivered
            );
        }
        samples.push(sample);
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(70), t).await;
    }
    let warm = samples.len() / 5;
    let after: Vec<f64> = samples.iter().skip(warm).map(|s| s.rss_mib).collect();
    let rss_after_warmup_mib = (
        after.iter().copied().fold(f64::INFINITY, f64::min),
        after.iter().copied().fold(0.0, f64::max),
    );
    Ok(SoakReport {
        minutes,
        samples,
        sessions: counters.sessions.load(Ordering::Relaxed),
        posts: counters.posts.load(Ordering::Relaxed),
        delivered: counters.delivered.load(Ordering::Relaxed),
        gaps: counters.gaps.load(Ordering::Relaxed),
        failures: counters.failures.load(Ordering::Relaxed),
        rss_after_warmup_mib: if after.is_empty() {
            (0.0, 0.0)
        } else {
            rss_after_warmup_mib
        },
    })
}

/// One follower: connects, follows, reads (or stalls a while) for
/// `lifetime`, then leaves.
async fn follower_life(
    endpoint: &quinn::Endpoint,
    opts: ClientOptions,
    channels: &[String],
    lifetime: Duration,
    stalls: bool,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(), herald_client::ClientError> {
    let mut client = Client::connect_via(endpoint, opts).await?;
    counters.connected.fetch_add(1, Ordering::Relaxed);
    counters.sessions.fetch_add(1, Ordering::Relaxed);
    let mut result = Ok(());
    for c in channels {
        if let Err(e) = client.follow(c).await {
            result = Err(e);
            break;
        }
    }
    let end = tokio::time::Instant::now() + lifetime;
    let stall_at = tokio::time::Instant::now() + lifetime / 3;
    let mut stalled = false;
    while result.is_ok() && tokio::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        if stalls && !stalled && tokio::time::Instant::now() >= stall_at {
            // Stop reading: the client's buffer fills, then the server's
            // queue; the server marks it lagged and catches it up later.
            stalled = true;
            let pause = Duration::from_secs(5 + (lifetime.as_secs() % 16));
            tokio::time::sleep(
                pause.min(end.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(500), client.next_event()).await {
            Ok(Some(Event::Post(_))) => {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Event::Closed { reason, .. })) => {
                tracing::warn!(%reason, "soak follower closed");
                break;
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    counters.gaps.fetch_add(
        client.stats().gaps.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    counters.connected.fetch_sub(1, Ordering::Relaxed);
    client.close().await;
    result
}
