//! Damaged or lost database files.
//!
//! - An empty (0-byte) or missing `herald.redb`, `brands.redb` or
//!   `promo.redb` of an existing data directory stops `herald serve` with a
//!   message naming the file and what to do, never a silent empty database.
//! - A bit-flipped `brands.redb` never makes the server panic (exit 101): it
//!   starts, or it stops with a message naming the file.
//! - A bit-flipped post in `herald.redb` is reported by `herald check`, and a
//!   follower replaying across it gets it as a `damaged` tombstone and goes
//!   on, instead of being closed on every reconnect.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;

use herald_client::{Event, FollowFrom};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::*;

const DATABASES: [&str; 3] = ["herald.redb", "brands.redb", "promo.redb"];

/// A data directory with a brand, a channel of it with `posts` posts
/// (`post-number-NN`), a campaign and a channel slot; the server stopped.
async fn populated(dir: &Path, posts: u64) {
    let server = TestServer::start(dir).await;
    server.brand("acme").await;
    server.channel("c", "acme").await;
    for i in 1..=posts {
        let r = server
            .publish("c", &server.admin_key, &format!("post-number-{i:02}"), None)
            .await;
        assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    }
    let r = server
        .call(
            reqwest::Method::PUT,
            "/v1/channels/c/promo",
            server.admin(),
            Some(json!({"opt_in": true})),
            &[],
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    let now = herald_server::model::now_ms();
    let r = server
        .post(
            "/v1/campaigns",
            server.admin(),
            json!({"advertiser": "acme",
                   "creative": {"title": "T", "text": "x", "cta_url": "https://a.example"},
                   "budget_impressions": 10, "cpm_bid_micros": 1, "end_ms": now + 60_000}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    server.stop().await;
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Starts `herald serve` on `dir`: `Ok` if it comes up (it is then killed),
/// else its exit code and standard error.
async fn serve_outcome(dir: &Path) -> Result<(), (Option<i32>, String)> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--quic-addr"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--http-addr"),
            OsStr::new("127.0.0.1:0"),
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = child.stderr.take().unwrap();
    let came_up = tokio::time::timeout(WAIT, async {
        while let Ok(Some(l)) = out.next_line().await {
            if l.starts_with("herald listening:") {
                return true;
            }
        }
        false
    })
    .await
    .expect("herald starts or stops in time");
    if came_up {
        child.kill().await.unwrap();
        return Ok(());
    }
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut err, &mut text)
        .await
        .unwrap();
    Err((status.code(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_missing_databases_stop_the_server_with_a_clear_message() {
    let base = tempfile::tempdir().unwrap();
    populated(base.path(), 3).await;
    assert!(
        base.path().join("herald-data.toml").is_file(),
        "the marker is written when the data directory is set up"
    );
    assert!(
        serve_outcome(base.path()).await.is_ok(),
        "intact: it starts"
    );
    for file in DATABASES {
        // Empty.
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        std::fs::File::create(dir.path().join(file)).unwrap();
        let (code, stderr) = serve_outcome(dir.path()).await.unwrap_err();
        assert_eq!(code, Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(file) && stderr.contains("empty") && stderr.contains("Restore"),
            "{file}: {stderr}"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(file)).unwrap().len(),
            0,
            "{file} was left as it was"
        );
        // Missing.
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let (code, stderr) = serve_outcome(dir.path()).await.unwrap_err();
        assert_eq!(code, Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(file) && stderr.contains("missing"),
            "{file}: {stderr}"
        );
        assert!(!dir.path().join(file).exists(), "{file} was not recreated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_brands_database_never_panics() {
    let base = tempfile::tempdir().unwrap();
    populated(base.path(), 1).await;
    let len = std::fs::metadata(base.path().join("brands.redb"))
        .unwrap()
        .len();
    let mut refused = 0;
    for k in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let path = dir.path().join("brands.redb");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = ((k * len) / 12 + 37) as usize % bytes.len();
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        match serve_outcome(dir.path()).await {
            Ok(()) => {}
            Err((code, stderr)) => {
                refused += 1;
                assert_ne!(code, Some(101), "a panic (byte {at}): {stderr}");
                assert_eq!(code, Some(1), "byte {at}: {stderr}");
                assert!(stderr.contains("brands.redb"), "byte {at}: {stderr}");
            }
        }
    }
    eprintln!("{refused} of 12 bit flips refused with a clear message; the rest started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_post_is_reported_and_skipped_visibly() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 8).await;
    let d = dir.path().as_os_str();
    let (code, out, err) = run_herald(&[OsStr::new("check"), OsStr::new("--data-dir"), d]).await;
    assert_eq!(code, Some(0), "intact: {out}{err}");

    // Flip the high bit of one character of post 5, wherever redb keeps a
    // copy of it (invalid UTF-8 that the code before seals died on).
    let path = dir.path().join("herald.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"post-number-05";
    let mut flipped = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + 3] ^= 0x80;
            flipped += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    assert!(flipped > 0, "post 5 not found in the file");
    std::fs::write(&path, &bytes).unwrap();

    let (code, out, err) = run_herald(&[OsStr::new("check"), OsStr::new("--data-dir"), d]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("herald.redb: DAMAGED"), "{out}");
    assert!(out.contains("post c/5"), "{out}");
    assert!(out.contains("brands.redb: ok"), "{out}");

    // The server starts; a follower replaying from the start gets post 5 as
    // a damaged tombstone, goes on, and stays connected for live posts.
    let server = TestServer::start(dir.path()).await;
    let mut f = server.client("f").await;
    f.follow_from(
        "c",
        FollowFrom {
            after_seq: Some(0),
            epoch: None,
            tail: 0,
        },
    )
    .await
    .unwrap();
    server.api.publish("c", "live").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 9 {
        match next(&mut f).await {
            Event::Post(p) => got.push((p.seq, p.text, p.deleted, p.damaged)),
            Event::Promoted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_gapless(&seqs, 1, 9);
    assert_eq!(got[4], (5, String::new(), true, true), "{got:?}");
    assert_eq!(got[5].1, "post-number-06");
    assert_eq!(got[8].1, "live");
    assert_eq!(f.stats().gaps.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The history says so too; deleting the damaged post repairs it.
    let h = server
        .get("/v1/channels/c/posts?after_seq=4&limit=1", server.admin())
        .await;
    assert_eq!(h.body["posts"][0]["damaged"], true, "{}", h.body);
    let r = server
        .call(
            reqwest::Method::DELETE,
            "/v1/channels/c/posts/5",
            server.admin(),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    f.close().await;
    server.stop().await;
    let (code, out, err) = run_herald(&[OsStr::new("check"), OsStr::new("--data-dir"), d]).await;
    assert_eq!(code, Some(0), "after deleting the damaged post: {out}{err}");
}
