//! Cluster mode end to end: Herald nodes sharing one 3-node NATS JetStream
//! cluster (real `nats-server` processes on loopback, started per test by
//! [`crate::nats_cluster`]), followers over real QUIC through the public
//! client, brands over real HTTP. One test per promise of issue 12:
//!
//! - followers on node A get what is published on node B, gapless, in order,
//!   exactly once; history and channel figures agree on both nodes;
//! - publishers on both nodes at once: seqs gapless, every acked post once;
//!   one `Idempotency-Key` used on both nodes posts once;
//! - kill -9 of the NATS node leading the posts stream mid-publishing: no
//!   acknowledged post lost, publishing goes on;
//! - kill -9 of Herald node A (the real binary): its followers move to node
//!   B and end with every post exactly once, in order;
//! - a 1,000-impression campaign across two nodes spends at most 1,000, and
//!   its impressions equal the promoted frames the followers received.
//!
//! Every wait is bounded ([`WAIT`]; a NATS election is given
//! [`ELECTION_WAIT`]). Without a `nats-server` binary these tests are skipped
//! with a notice, unless `HERALD_REQUIRE_NATS` is set (as `.ci/run` does).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use crate::nats_cluster::Cluster;
use herald::cli::ApiClient;
use herald_client::{Client, ClientOptions, Event};
use herald_server::config::Config;
use serde_json::json;

/// How long a publish may take while the posts stream elects a new leader.
const ELECTION_WAIT: Duration = Duration::from_secs(45);

/// Starts a 3-node NATS cluster (blocking, bounded by the testkit).
async fn nats() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start().expect("start a 3-node nats-server cluster"))
        .await
        .unwrap()
}

/// A node's configuration: free loopback ports, `dir`, the cluster's URLs.
fn node_config(dir: &Path, cluster: &Cluster, node_id: &str) -> Config {
    let mut cfg = config(dir);
    cfg.cluster.urls = cluster.urls();
    cfg.cluster.node_id = node_id.to_string();
    cfg.cluster.request_timeout_ms = 2000;
    cfg.limits.publish_per_sec = 10_000.0;
    cfg.limits.publish_burst = 10_000;
    cfg
}

/// Gives `to` the same admin key, token secret and certificate as `from`, as
/// an operator does for the nodes of one cluster.
fn copy_secrets(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("tls")).unwrap();
    for f in [
        herald_server::auth::ADMIN_KEY_FILE,
        herald_server::auth::JWT_SECRET_FILE,
        herald_server::tls::CERT_FILE,
        herald_server::tls::KEY_FILE,
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Node A in-process, then node B in-process with A's secrets.
async fn two_nodes(cluster: &Cluster) -> (tempfile::TempDir, TestServer, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = TestServer::start_with(node_config(&da, cluster, "a")).await;
    copy_secrets(&da, &db);
    let b = TestServer::start_with(node_config(&db, cluster, "b")).await;
    assert_eq!(a.admin_key, b.admin_key);
    (dir, a, b)
}

/// Waits until `node` knows channel `id` (created on another node).
async fn wait_channel(node: &TestServer, id: &str) {
    tokio::time::timeout(WAIT, async {
        while node.api.channel(id).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the channel reaches the other node");
}

/// Options for a follower that may use every node in `servers`, noticing a
/// dead node within about two seconds.
fn multi_options(
    node: &TestServer,
    servers: Vec<std::net::SocketAddr>,
    user: &str,
) -> ClientOptions {
    let mut o = ClientOptions::with_servers(servers, node.trust.clone(), node.token(user));
    o.backoff_min = Duration::from_millis(20);
    o.backoff_max = Duration::from_millis(300);
    o.keep_alive = Duration::from_millis(300);
    o.idle_timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_secs(2);
    o
}

/// Reads posts of one channel until seq `last`; asserts each arrives once,
/// in order, from 1. Returns the texts.
async fn read_until(c: &mut Client, last: u64, within: Duration) -> Vec<String> {
    let mut texts = Vec::new();
    let mut next = 1;
    tokio::time::timeout(within, async {
        while next <= last {
            match c.next_event().await.expect("client open") {
                Event::Post(p) => {
                    assert_eq!(p.seq, next, "posts arrive once, in order, with no gap");
                    next += 1;
                    texts.push(p.text);
                }
                Event::Closed { reason, .. } => panic!("client closed: {reason}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out at seq {next} of {last}"));
    texts
}

/// Every post of `channel` through `node`'s history API.
async fn history(node: &TestServer, channel: &str) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let h = node.api.history(channel, after, 1000).await.unwrap();
        if h.posts.is_empty() {
            return out;
        }
        for p in h.posts {
            after = p.seq;
            out.push((p.seq, p.id.clone(), p.text.clone()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_on_one_node_get_posts_published_on_another() {
    if !crate::nats_cluster::available() {
        return;
    }
    let cluster = nats().await;
    let (_dir, a, b) = two_nodes(&cluster).await;
    a.brand("acme").await;
    a.channel("news", "acme").await;
    wait_channel(&b, "news").await;

    let mut on_a = a.client("fa").await;
    on_a.follow("news").await.unwrap();
    let mut on_b = b.client("fb").await;
    on_b.follow("news").await.unwrap();
    for i in 1..=40 {
        let p = b.api.publish("news", &format!("post {i}")).await.unwrap();
        assert_eq!(p.seq, i);
    }
    let got_a = read_until(&mut on_a, 40, WAIT).await;
    let got_b = read_until(&mut on_b, 40, WAIT).await;
    let want: Vec<String> = (1..=40).map(|i| format!("post {i}")).collect();
    assert_eq!(got_a, want);
    assert_eq!(got_b, want);
    assert_eq!(on_a.stats().get(&on_a.stats().duplicates_dropped), 0);

    // An edit on A reaches B's follower too, and both histories agree.
    let r = a
        .call(
            reqwest::Method::PATCH,
            "/v1/channels/news/posts/7",
            a.admin(),
            Some(json!({"text": "seven, edited"})),
            &[],
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Edited { seq: 7, text, .. }) = on_b.next_event().await {
                assert_eq!(text, "seven, edited");
                return;
            }
        }
    })
    .await
    .expect("the edit reaches node B's follower");
    let (ha, hb) = (history(&a, "news").await, history(&b, "news").await);
    assert_eq!(ha.len(), 40);
    assert_eq!(ha, hb, "history is the same on both nodes");
    let (ca, cb) = (
        a.api.channel("news").await.unwrap(),
        b.api.channel("news").await.unwrap(),
    );
    assert_eq!((ca.head_seq, ca.oldest_seq, ca.epoch), (40, 1, 1));
    assert_eq!(
        (cb.head_seq, cb.oldest_seq, cb.epoch, cb.title),
        (40, 1, 1, ca.title)
    );
    // A late follower on A resumes from a seq with the same seqs.
    let mut late = a.client("late").await;
    late.follow_from(
        "news",
        herald_client::FollowFrom {
            after_seq: Some(30),
            epoch: Some(1),
            tail: 0,
        },
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 10 {
        if let Event::Post(p) = next(&mut late).await {
            seqs.push(p.seq);
        }
    }
    assert_gapless(&seqs, 31, 40);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_both_nodes_get_gapless_seqs() {
    if !crate::nats_cluster::available() {
        return;
    }
    let cluster = nats().await;
    let (_dir, a, b) = two_nodes(&cluster).await;
    a.brand("acme").await;
    a.channel("busy", "acme").await;
    wait_channel(&b, "busy").await;
    let mut fa = a.client("fa").await;
    fa.follow("busy").await.unwrap();

    const PER_TASK: usize = 15;
    let mut tasks = Vec::new();
    for (node, base) in [(&a, a.base.clone()), (&b, b.base.clone())] {
        for t in 0..4 {
            let api = ApiClient::new(&base, node.admin_key.clone());
            let name = format!("{}-{t}", if base == a.base { "a" } else { "b" });
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PER_TASK {
                    let p = api.publish("busy", &format!("{name}-{i}")).await.unwrap();
                    acked.push((p.seq, p.id));
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(tokio::time::timeout(WAIT * 2, t).await.unwrap().unwrap());
    }
    let total = acked.len() as u64;
    assert_eq!(total, 8 * PER_TASK as u64);
    acked.sort();
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_gapless(&seqs, 1, total);
    let h = history(&b, "busy").await;
    assert_eq!(
        h.iter()
            .map(|(s, id, _)| (*s, id.clone()))
            .collect::<Vec<_>>(),
        acked,
        "every acknowledged post is there once, at its seq"
    );
    read_until(&mut fa, total, WAIT).await;

    // One Idempotency-Key used on both nodes posts once.
    let first = a.publish("busy", &a.admin_key, "once", Some("k-1")).await;
    let again = b.publish("busy", &b.admin_key, "once", Some("k-1")).await;
    assert_eq!(first.status.as_u16(), 201, "{}", first.body);
    assert!(again.status.is_success(), "{}", again.body);
    assert_eq!(first.body["seq"], total + 1);
    assert_eq!(again.body["seq"], first.body["seq"]);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(b.api.channel("busy").await.unwrap().head_seq, total + 1);
    a.stop().await;
    b.stop().await;
}

/// Index of the NATS node leading the posts stream.
async fn stream_leader(cluster: &Cluster) -> usize {
    let mut cfg =
        herald_server::cluster::ClusterConfig::from_url_list(&cluster.url_list(), "probe").unwrap();
    cfg.request_timeout = Duration::from_secs(2);
    let nats = herald_server::cluster::Nats::connect(cfg).await.unwrap();
    let mut st = nats.js.get_stream(nats.cfg.posts_stream()).await.unwrap();
    let info = st.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("stream leader");
    cluster
        .nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("leader is a node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_nats_node_mid_publishing_loses_no_acked_post() {
    if !crate::nats_cluster::available() {
        return;
    }
    let mut cluster = nats().await;
    let (_dir, a, b) = two_nodes(&cluster).await;
    a.brand("acme").await;
    a.channel("c", "acme").await;
    wait_channel(&b, "c").await;
    let mut fb = b.client("fb").await;
    fb.follow("c").await.unwrap();

    const PER_NODE: usize = 60;
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (tag, node) in [("a", &a), ("b", &b)] {
        let api = ApiClient::new(&node.base, node.admin_key.clone());
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..PER_NODE {
                let p = tokio::time::timeout(ELECTION_WAIT, api.publish("c", &format!("{tag}{i}")))
                    .await
                    .expect("a publish ends within the election bound")
                    .expect("publishing goes on through the failover");
                mine.push((p.seq, p.id));
                acked.fetch_add(1, Ordering::SeqCst);
            }
            mine
        }));
    }
    // Kill the stream's leader once some posts are in.
    tokio::time::timeout(WAIT, async {
        while acked.load(Ordering::SeqCst) < 30 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let victim = stream_leader(&cluster).await;
    cluster.kill(victim).unwrap();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(ELECTION_WAIT * 2, t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    all.sort();
    let total = all.len() as u64;
    assert_eq!(total, 2 * PER_NODE as u64);
    assert_gapless(&all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), 1, total);
    let h = history(&a, "c").await;
    assert_eq!(
        h.iter()
            .map(|(s, id, _)| (*s, id.clone()))
            .collect::<Vec<_>>(),
        all,
        "every acknowledged post is there once"
    );
    read_until(&mut fb, total, WAIT).await;
    // Publishing goes on after the failover, and the old leader comes back.
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(victim).unwrap();
        cluster
    })
    .await
    .unwrap();
    let p = b.api.publish("c", "after").await.unwrap();
    assert_eq!(p.seq, total + 1);
    a.stop().await;
    b.stop().await;
}

/// The real `herald` binary in cluster mode, as node `node_id`.
async fn spawn_node(dir: &Path, cluster: &Cluster, node_id: &str) -> Spawned {
    let urls = cluster.url_list();
    let args = ["--quic-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    let cluster_args = ["--cluster", &urls, "--node-id", node_id];
    spawn_server_with(dir, &[&args[..], &cluster_args[..]].concat()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_herald_node_moves_its_followers_to_another() {
    if !crate::nats_cluster::available() {
        return;
    }
    let cluster = nats().await;
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let b = TestServer::start_with(node_config(&db, &cluster, "b")).await;
    copy_secrets(&db, &da);
    let mut a = spawn_node(&da, &cluster, "a").await;
    b.brand("acme").await;
    b.channel("live", "acme").await;

    // Followers start on A (first in their list) and know B.
    let mut followers = Vec::new();
    for i in 0..4 {
        let c = Client::connect(multi_options(&b, vec![a.quic, b.quic], &format!("f{i}")))
            .await
            .unwrap();
        assert_eq!(c.stats().get(&c.stats().server_index), 0, "on node A");
        followers.push(c);
    }
    tokio::time::timeout(WAIT, async {
        for c in &followers {
            while c.follow("live").await.is_err() {
                // A may not know the channel for a moment.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await
    .unwrap();
    for i in 1..=30 {
        b.api.publish("live", &format!("p{i}")).await.unwrap();
    }
    // Everyone has the first half through A...
    let mut firsts = Vec::new();
    for c in followers.iter_mut() {
        firsts.push(read_until(c, 30, WAIT).await);
    }
    // ... then A dies, and the rest is published while they move.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    for i in 31..=60 {
        b.api.publish("live", &format!("p{i}")).await.unwrap();
    }
    let want: Vec<String> = (1..=60).map(|i| format!("p{i}")).collect();
    for (c, first) in followers.iter_mut().zip(firsts) {
        let mut texts = first;
        let mut next = 31;
        tokio::time::timeout(WAIT, async {
            while next <= 60 {
                match c.next_event().await.expect("client open") {
                    Event::Post(p) => {
                        assert_eq!(p.seq, next, "once, in order, no gap across the move");
                        next += 1;
                        texts.push(p.text);
                    }
                    Event::Closed { reason, .. } => panic!("closed: {reason}"),
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("follower stuck at {next}"));
        assert_eq!(texts, want);
        assert_eq!(c.stats().get(&c.stats().server_index), 1, "now on node B");
        assert!(c.stats().get(&c.stats().reconnects) >= 1);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_across_two_nodes_never_overspends_and_counts_every_frame() {
    if !crate::nats_cluster::available() {
        return;
    }
    let cluster = nats().await;
    let (_dir, a, b) = two_nodes(&cluster).await;
    a.brand("acme").await;
    let chans = ["s1", "s2"];
    for ch in chans {
        a.channel(ch, "acme").await;
        let r = a
            .call(
                reqwest::Method::PUT,
                &format!("/v1/channels/{ch}/promo"),
                a.admin(),
                Some(json!({"opt_in": true, "every_posts": 1})),
                &[],
            )
            .await;
        assert!(r.status.is_success(), "{}", r.body);
        wait_channel(&b, ch).await;
    }
    let now = herald_server::model::now_ms();
    let r = a
        .post(
            "/v1/campaigns",
            a.admin(),
            json!({
                "advertiser": "acme",
                "creative": {"title": "Shoes", "text": "Fast shoes", "cta_url": "https://acme.example/shoes"},
                "budget_impressions": 1000,
                "cpm_bid_micros": 2_000_000,
                "start_ms": now - 1_000_000_000,
                "end_ms": now + 3_600_000,
                "state": "active"
            }),
        )
        .await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    // B learns of the campaign and the slot settings at its next sync.
    tokio::time::timeout(WAIT, async {
        while b
            .get(&format!("/v1/campaigns/{id}"), b.admin())
            .await
            .status
            != 200
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the campaign reaches node B");

    // 12 followers per node on both channels; 40 posts per channel, each
    // opening the slot: far more wanted (2 x 40 x 24 = 1,920) than the budget.
    let mut followers = Vec::new();
    for (tag, node) in [("a", &a), ("b", &b)] {
        for i in 0..12 {
            let c = node.client(&format!("{tag}{i}")).await;
            for ch in chans {
                c.follow(ch).await.unwrap();
            }
            followers.push(c);
        }
    }
    const POSTS: u64 = 40;
    let (pa, pb) = (a.api.clone(), b.api.clone());
    let publish = tokio::spawn(async move {
        for i in 1..=POSTS {
            let api = if i % 2 == 0 { &pa } else { &pb };
            for ch in ["s1", "s2"] {
                api.publish(ch, &format!("{ch}-{i}")).await.unwrap();
            }
            // Let leases top up between posts (every flush interval).
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    });
    let mut promoted = 0u64;
    for c in followers.iter_mut() {
        let mut posts: BTreeMap<String, u64> = BTreeMap::new();
        tokio::time::timeout(WAIT * 2, async {
            while posts.values().sum::<u64>() < POSTS * 2 {
                match c.next_event().await.expect("open") {
                    Event::Post(p) => *posts.entry(p.channel.to_string()).or_default() += 1,
                    Event::Promoted { campaign_id, .. } => {
                        assert_eq!(campaign_id, id);
                        promoted += 1;
                    }
                    Event::Closed { reason, .. } => panic!("closed: {reason}"),
                    _ => {}
                }
            }
        })
        .await
        .expect("every post arrives");
    }
    publish.await.unwrap();
    assert!(promoted > 0, "the campaign was shown");
    // Both nodes flush their counts and see each other's: the merged
    // impressions equal the frames received, on either node. Frames fanned
    // out after the last post may still be on the way: keep reading them.
    let mut last = (0, 0);
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            for c in followers.iter_mut() {
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_millis(2), c.next_event()).await
                {
                    if let Event::Promoted { .. } = ev {
                        promoted += 1;
                    }
                }
            }
            assert!(
                promoted <= 1000,
                "never more frames than the budget: {promoted}"
            );
            let sa = a
                .get(&format!("/v1/campaigns/{id}/stats"), a.admin())
                .await
                .body;
            let sb = b
                .get(&format!("/v1/campaigns/{id}/stats"), b.admin())
                .await
                .body;
            let (ia, ib) = (
                sa["impressions"].as_u64().unwrap(),
                sb["impressions"].as_u64().unwrap(),
            );
            assert!(
                ia <= 1000 && ib <= 1000,
                "spent at most the budget: {ia}, {ib}"
            );
            last = (ia, ib);
            if ia == promoted && ib == promoted {
                assert_eq!(sa["spend_micros"].as_u64().unwrap(), promoted * 2_000);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "impressions (node A, node B) = {last:?}, frames received = {promoted}"
    );
    a.stop().await;
    b.stop().await;
}
