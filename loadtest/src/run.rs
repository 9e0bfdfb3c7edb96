//! The measurement run, phase by phase: create channels, connect and follow
//! (at the connect rate), idle (server idle CPU, memory per follower),
//! publish and wait for every delivery (throughput, latency, server CPU),
//! then stop the followers and verify what they received.
//!
//! Every phase is bounded: the loops by the configured counts, the waits by
//! the timeout. Progress bars tick from the shared counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::cli::ApiClient;
use herald_client::ClientOptions;
use herald_server::auth::TokenIssuer;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{watch, Semaphore};

use crate::follower::{self, FollowerResult, FollowerSpec, Shared};
use crate::options::Engine;
use crate::plan::Plan;
use crate::probe::Sample;
use crate::publisher::publish_all;
use crate::report::{
    us_histogram, ConnectReport, DeliveryReport, NodeReport, Percentiles, PublishReport, Report,
    ServerInfo, ServerStats,
};
use crate::verify::verify;
use crate::{LoadError, Options, Target};

/// Lifetime of the follower tokens the run mints.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long followers get to stop and hand in their tallies.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Progress bar refresh period.
const TICK: Duration = Duration::from_millis(100);
/// Longest one follower's connection attempt may take (see its use).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn bar(len: u64, msg: &'static str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

/// The followers of a run, as the chosen engine runs them.
enum Followers {
    /// One task per follower, on shared quinn endpoints.
    Client {
        tasks: Vec<tokio::task::JoinHandle<FollowerResult>>,
        endpoints: Vec<quinn::Endpoint>,
    },
    /// Event-loop threads ([`crate::engine`]).
    Loop(crate::engine::Engine),
}

impl Followers {
    /// Stops every follower (the client engine's tasks were told through
    /// the run's stop signal) and collects their results in follower order,
    /// within [`STOP_GRACE`].
    async fn stop(self) -> Vec<FollowerResult> {
        match self {
            Followers::Loop(engine) => engine.stop(STOP_GRACE).await,
            Followers::Client { tasks, endpoints } => {
                let grace = tokio::time::Instant::now() + STOP_GRACE;
                let mut results: Vec<FollowerResult> = Vec::with_capacity(tasks.len());
                for t in tasks {
                    let abort = t.abort_handle();
                    match tokio::time::timeout_at(grace, t).await {
                        Ok(Ok(r)) => results.push(r),
                        Ok(Err(e)) => results.push(FollowerResult {
                            error: Some(format!("follower task failed: {e}")),
                            ..FollowerResult::default()
                        }),
                        Err(_) => {
                            abort.abort();
                            results.push(FollowerResult {
                                error: Some("follower did not stop in time".into()),
                                ..FollowerResult::default()
                            });
                        }
                    }
                }
                for e in &endpoints {
                    e.close(0u32.into(), b"done");
                }
                for e in &endpoints {
                    let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
                }
                results
            }
        }
    }
}

/// Runs one measurement against `target`. An `Err` means the run could not
/// be carried out; a completed run with violations is `Ok` with
/// `report.verify.ok == false`.
pub async fn run(opts: &Options, target: &Target) -> Result<Report, LoadError> {
    run_on(opts, target, &[]).await
}

/// [`run`] against the nodes of one cluster: `target` and `others`. Posts
/// are published through `target`'s API; follower `i` connects to node
/// `i % nodes` first and knows the others (so it moves if its node dies).
/// Figures are reported per node and in total.
pub async fn run_on(
    opts: &Options,
    target: &Target,
    others: &[crate::Node],
) -> Result<Report, LoadError> {
    opts.validate()?;
    let http = reqwest::Client::new();
    let api = ApiClient::new(&target.api, target.admin_key.clone());

    // Fresh channels per run, so seqs start at 1 even on a shared server.
    let run_id = format!("lt{:x}", now_us());
    let channels: Vec<String> = (0..opts.channels)
        .map(|i| format!("{run_id}-{i}"))
        .collect();
    for ch in &channels {
        api.create_channel(ch, "herald-loadtest").await?;
    }
    let campaign = if opts.campaign {
        Some(crate::campaign::start(&http, target, &channels).await?)
    } else {
        None
    };
    let plan = Plan::new(
        opts.followers,
        opts.channels,
        opts.follows,
        opts.posts,
        opts.zipf,
        opts.seed,
    );
    let shared = Arc::new(Shared::new(
        &channels,
        &plan.posts_per_channel,
        opts.followers as u64,
    ));
    let nodes = target.nodes(others);
    let before = read_all(&nodes, &http).await;

    // Connect and follow.
    let mut base = ClientOptions::new(target.quic, target.trust.clone(), String::new());
    base.client_name = "herald-loadtest".into();
    base.live_datagrams = opts.live_datagrams;
    // Thousands of handshakes at once on shared cores: an Initial lost to a
    // full socket buffer costs QUIC's doubling retransmit timer (1 s, 2 s,
    // 4 s), so the 5 s first-connect bound meant for an interactive client
    // would count a slow but sound handshake as a failure. The connect
    // phase as a whole is still bounded by `--timeout`.
    base.connect_timeout = CONNECT_TIMEOUT;
    let issuer = TokenIssuer::hs256(target.jwt_secret.as_bytes());
    let (stop_tx, stop_rx) = watch::channel(false);
    let pb = bar(opts.followers as u64, "connect", opts.quiet);
    let connect_started = Instant::now();
    let deadline = tokio::time::Instant::now() + opts.timeout();
    let mint = |i: usize| {
        issuer
            .mint(&format!("{run_id}-f{i}"), TOKEN_TTL)
            .map_err(|e| LoadError::Target(format!("cannot mint a token: {e}")))
    };
    let followers = match opts.engine {
        Engine::Client => {
            let endpoints = crate::endpoints::open(
                &base,
                opts.endpoints,
                opts.client_buffer_mib.saturating_mul(1 << 20),
            )?;
            let handshakes = Arc::new(Semaphore::new(opts.connect_concurrency));
            let mut pacer = (opts.connect_rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(
                    1.0 / f64::from(opts.connect_rate),
                ));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut tasks = Vec::with_capacity(opts.followers);
            for (i, follows) in plan.follows.iter().enumerate() {
                if let Some(p) = pacer.as_mut() {
                    p.tick().await;
                }
                if i % 64 == 0 {
                    pb.set_position(shared.settled.load(Ordering::Relaxed));
                }
                let token = mint(i)?;
                // Node `i % n` first, then the others: a follower whose node
                // dies moves to the next one.
                let mut servers: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.quic).collect();
                servers.rotate_left(i % nodes.len());
                let spec = FollowerSpec {
                    endpoint: endpoints[i % endpoints.len()].clone(),
                    opts: ClientOptions {
                        token,
                        servers,
                        ..base.clone()
                    },
                    channels: follows.iter().map(|&c| channels[c].clone()).collect(),
                };
                tasks.push(tokio::spawn(follower::run(
                    spec,
                    shared.clone(),
                    handshakes.clone(),
                    stop_rx.clone(),
                )));
            }
            Followers::Client { tasks, endpoints }
        }
        Engine::Loop => {
            // Follower `i` connects to node `i % n` (no failover: the loop
            // engine does not reconnect).
            let plans = plan
                .follows
                .iter()
                .enumerate()
                .map(|(i, follows)| {
                    Ok(crate::engine::FollowerPlan {
                        index: i,
                        token: mint(i)?,
                        channels: follows.iter().map(|&c| channels[c].clone()).collect(),
                        server: nodes[i % nodes.len()].quic,
                    })
                })
                .collect::<Result<Vec<_>, LoadError>>()?;
            let cfg = crate::engine::EngineConfig {
                client: crate::engine::client_config(
                    &base.trust,
                    base.keep_alive,
                    base.idle_timeout,
                    opts.live_datagrams,
                )?,
                live_datagrams: opts.live_datagrams,
                drop_datagrams_every: opts.drop_datagrams_every,
                server_name: base.server_name.clone(),
                client_name: base.client_name.clone(),
                sockets: opts.endpoints,
                buffer_bytes: opts.client_buffer_mib.saturating_mul(1 << 20),
                connect_rate: opts.connect_rate,
                connect_concurrency: opts.connect_concurrency,
                connect_timeout: CONNECT_TIMEOUT,
                max_feed_frame: base.max_feed_frame,
                started: connect_started,
            };
            let engine = crate::engine::Engine::start(cfg, plans, shared.clone())?;
            Followers::Loop(engine)
        }
    };
    let settled_all = loop {
        let settled = shared.settled.load(Ordering::Acquire);
        pb.set_position(settled);
        if settled >= opts.followers as u64 {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::select! {
            _ = shared.all_settled.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    };
    pb.finish();
    let connect_wall = connect_started.elapsed();
    let connect_failed = shared.connect_failed.load(Ordering::Relaxed);
    let connected = shared.settled.load(Ordering::Relaxed) - connect_failed;

    // Idle: memory per follower and idle CPU.
    let idle_start_all = read_all(&nodes, &http).await;
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let idle_end_all = read_all(&nodes, &http).await;
    let (before, idle_start, idle_end) = (sum(&before), sum(&idle_start_all), sum(&idle_end_all));

    // Publish and wait for every delivery.
    let expected = shared.remaining.load(Ordering::Acquire).max(0) as u64;
    let pb = bar(expected, "deliver", opts.quiet);
    let run_start_all = idle_end_all;
    let run_start = idle_end;
    let publish_started_us = now_us();
    let (published, completed) = if settled_all {
        let ticker = {
            let shared = shared.clone();
            let pb = pb.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    pb.set_position(shared.delivered.load(Ordering::Relaxed));
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            })
        };
        let published = publish_all(&api, &channels, &plan, opts, &shared).await;
        let deadline = tokio::time::Instant::now() + opts.timeout();
        let completed = shared.is_complete()
            || tokio::time::timeout_at(deadline, shared.complete.notified())
                .await
                .is_ok();
        ticker.abort();
        (published, completed)
    } else {
        (crate::publisher::Published::default(), false)
    };
    pb.set_position(shared.delivered.load(Ordering::Relaxed));
    pb.finish();
    let run_end_all = read_all(&nodes, &http).await;
    let run_end = sum(&run_end_all);
    let last_delivery_us = shared.last_delivery_at_us.load(Ordering::Relaxed);
    // Followers are still reading: let the last promoted frames arrive, then
    // compare what the server counted with what was received.
    let campaign = match campaign {
        Some(id) => Some(
            crate::campaign::settle(&http, target, &id, &shared.promoted, opts.timeout()).await?,
        ),
        None => None,
    };

    // Stop the followers and collect their tallies.
    let _ = stop_tx.send(true);
    let results = followers.stop().await;

    let mut verdict = verify(&results, &published.heads, published.failed);
    if let Some(c) = &campaign {
        if c.impressions != c.received {
            verdict.ok = false;
            verdict.examples.insert(
                0,
                format!(
                    "campaign {}: server counted {} impressions, followers received {} promoted frames",
                    c.id, c.impressions, c.received
                ),
            );
        }
    }
    if !settled_all {
        verdict.ok = false;
        let msg = format!(
            "connect phase timed out: {} of {} followers settled",
            connected + connect_failed,
            opts.followers
        );
        verdict.examples.insert(0, msg);
    }

    // Aggregate.
    let mut latency = us_histogram();
    let mut connect_hist = us_histogram();
    for r in &results {
        for &l in &r.latencies_us {
            latency.saturating_record(u64::from(l).max(1));
        }
        if r.connected {
            connect_hist.saturating_record((r.connect_time.as_micros() as u64).max(1));
        }
    }
    let mut last = us_histogram();
    for slot in shared.last_arrival_us.iter().flatten() {
        let v = slot.load(Ordering::Relaxed);
        if v > 0 {
            last.saturating_record(v);
        }
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let node_reports: Vec<NodeReport> = nodes
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let mine = results.iter().skip(k).step_by(nodes.len());
            let followers = mine.clone().filter(|r| r.connected).count() as u64;
            let got: u64 = mine
                .flat_map(|r| r.channels.iter())
                .map(|c| c.received)
                .sum();
            let cpu = match (run_start_all[k], run_end_all[k]) {
                (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
                _ => None,
            };
            NodeReport {
                quic: n.quic.to_string(),
                api: n.api.clone(),
                followers,
                delivered: got,
                run_cpu_seconds: cpu,
                deliveries_per_cpu_second: cpu.filter(|c| *c > 0.0).map(|c| got as f64 / c),
                peak_rss_bytes: run_end_all[k].map(|s| s.peak_rss_bytes),
            }
        })
        .collect();
    let wall = Duration::from_micros(last_delivery_us.saturating_sub(publish_started_us));
    let wall_secs = wall.as_secs_f64();
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let run_cpu = match (run_start, run_end) {
        (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
        _ => None,
    };
    let idle_cpu = match (idle_start, idle_end) {
        (Some(a), Some(b)) if opts.idle_secs > 0.0 => {
            Some((b.cpu_seconds - a.cpu_seconds) / opts.idle_secs * 100.0)
        }
        _ => None,
    };
    let per_follower = match (before, idle_start) {
        (Some(a), Some(b)) if connected > 0 => {
            Some((b.rss_bytes as f64 - a.rss_bytes as f64) / connected as f64)
        }
        _ => None,
    };
    Ok(Report {
        options: opts.clone(),
        server: ServerInfo {
            quic: target.quic.to_string(),
            api: target.api.clone(),
            probe: target.probe.source().to_string(),
        },
        connect: ConnectReport {
            followers: opts.followers as u64,
            connected,
            failed: connect_failed,
            wall_secs: connect_wall.as_secs_f64(),
            per_sec: rate(connected, connect_wall.as_secs_f64()),
            time_ms: Percentiles::from_us(&connect_hist),
        },
        publish: PublishReport {
            posts: opts.posts as u64,
            ok: published.ok,
            failed: published.failed,
            wall_secs: published.wall.as_secs_f64(),
            latency_ms: published
                .latency_us
                .as_ref()
                .map(Percentiles::from_us)
                .unwrap_or_default(),
        },
        delivery: DeliveryReport {
            expected,
            delivered,
            completed,
            wall_secs,
            per_sec: rate(delivered, wall_secs),
            latency_ms: Percentiles::from_us(&latency),
            last_follower_ms: Percentiles::from_us(&last),
            datagram_posts: results.iter().map(|r| r.datagram_posts).sum(),
            stream_posts: results.iter().map(|r| r.stream_posts).sum(),
            resends: results.iter().map(|r| r.resends).sum(),
            datagrams_dropped: results.iter().map(|r| r.datagrams_dropped).sum(),
        },
        server_stats: ServerStats {
            source: target.probe.source().to_string(),
            idle_cpu_percent: idle_cpu,
            run_cpu_seconds: run_cpu,
            deliveries_per_cpu_second: run_cpu.filter(|c| *c > 0.0).map(|c| delivered as f64 / c),
            rss_before_bytes: before.map(|s: Sample| s.rss_bytes),
            rss_connected_bytes: idle_start.map(|s| s.rss_bytes),
            peak_rss_bytes: run_end.map(|s| s.peak_rss_bytes),
            bytes_per_idle_follower: per_follower,
        },
        nodes: node_reports,
        campaign,
        verify: verdict,
    })
}

/// Every node's figures now.
async fn read_all(nodes: &[crate::Node], http: &reqwest::Client) -> Vec<Option<Sample>> {
    let mut v = Vec::with_capacity(nodes.len());
    for n in nodes {
        v.push(n.probe.read(http).await);
    }
    v
}

/// The nodes' figures added up (CPU and memory), `None` if any is missing.
fn sum(samples: &[Option<Sample>]) -> Option<Sample> {
    samples.iter().try_fold(
        Sample {
            cpu_seconds: 0.0,
            rss_bytes: 0,
            peak_rss_bytes: 0,
        },
        |acc, s| {
            let s = (*s)?;
            Some(Sample {
                cpu_seconds: acc.cpu_seconds + s.cpu_seconds,
                rss_bytes: acc.rss_bytes + s.rss_bytes,
                peak_rss_bytes: acc.peak_rss_bytes + s.peak_rss_bytes,
            })
        },
    )
}
