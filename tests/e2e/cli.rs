//! The `herald` command line, run as the real binary against a real server:
//! what a newcomer does in the first hour, and what used to trip them up.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::*;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// `herald <args>` with the test server's data directory and addresses (in
/// the environment, so that a test can still pass its own flags).
fn herald(server: &TestServer, args: &[&str]) -> Command {
    let mut c = Command::new(HERALD);
    c.args(args)
        .env("HERALD_DATA_DIR", &server.data_dir)
        .env("HERALD_SERVER", server.quic.to_string())
        .env("HERALD_API", &server.base)
        .env_remove("HERALD_API_KEY")
        .env_remove("HERALD_TOKEN")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    c
}

/// Runs to completion (bounded); returns (success, stdout, stderr).
async fn output(mut c: Command) -> (bool, String, String) {
    let out = tokio::time::timeout(WAIT, c.stdin(Stdio::null()).output())
        .await
        .expect("the command finishes")
        .expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends SIGINT, as Ctrl-C does.
async fn interrupt(child: &Child) {
    let pid = child.id().expect("still running").to_string();
    let ok = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(ok.success());
}

async fn followers(server: &TestServer, channel: &str) -> u64 {
    server.api.channel(channel).await.unwrap().followers as u64
}

/// Polls `followers` until it equals `want`, for at most `within`.
async fn wait_followers(server: &TestServer, channel: &str, want: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = followers(server, channel).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} followers of {channel}, expected {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A follower process whose stdout lines the test can read.
struct Follower {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Follower {
    fn start(server: &TestServer, args: &[&str]) -> Follower {
        let mut child = herald(server, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("herald follow starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Follower { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("still running")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_follow_leaves_no_ghost_and_each_run_is_its_own_follower() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Were every `herald follow` the same follower, the second would be refused.
    cfg.limits.max_connections_per_follower = 1;
    let server = TestServer::start_with(cfg).await;
    server.api.create_channel("news", "").await.unwrap();
    let mut procs: Vec<Follower> = (0..5)
        .map(|_| Follower::start(&server, &["follow", "news", "--json"]))
        .collect();
    for p in &mut procs {
        assert!(p.line().await.contains(r#""type":"followed""#));
    }
    wait_followers(&server, "news", 5, WAIT).await;
    for p in &procs {
        interrupt(&p.child).await;
    }
    for p in &mut procs {
        let status = tokio::time::timeout(WAIT, p.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "Ctrl-C is a normal way to stop: {status}");
    }
    // The close was sent before each process exited: the server forgets
    // them at once, not after the idle timeout.
    wait_followers(&server, "news", 0, Duration::from_secs(2)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_json_says_followed_then_prints_posts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("news", "").await.unwrap();
    server.api.publish("news", "before").await.unwrap();
    let mut f = Follower::start(&server, &["follow", "news", "--json"]);
    let followed: serde_json::Value = serde_json::from_str(&f.line().await).unwrap();
    assert_eq!(
        followed,
        serde_json::json!({"type": "followed", "channel": "news", "head_seq": 1, "epoch": 1})
    );
    server.api.publish("news", "hello").await.unwrap();
    let post: serde_json::Value = serde_json::from_str(&f.line().await).unwrap();
    assert_eq!(post["type"], "post");
    assert_eq!(post["channel"], "news");
    assert_eq!(post["seq"], 2);
    assert_eq!(post["text"], "hello");
    assert_eq!(post["deleted"], false);
    assert_eq!(post["damaged"], false);
    interrupt(&f.child).await;
    let status = tokio::time::timeout(WAIT, f.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_without_a_server_fails_fast_and_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // A port nobody listens on.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = herald(&server, &["follow", "news"]);
    c.arg("--server").arg(closed.to_string());
    let started = std::time::Instant::now();
    let (ok, _, err) = output(c).await;
    let took = started.elapsed();
    assert!(!ok);
    assert!(
        took < Duration::from_secs(5) + Duration::from_millis(900),
        "took {took:?}"
    );
    assert!(err.contains(&closed.to_string()), "{err}");
    assert!(
        err.contains("herald serve"),
        "a hint how to start one: {err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_takes_a_url_or_an_address_and_post_reads_stdin_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let bare = server.http.to_string();
    for (id, api) in [("a", server.base.as_str()), ("b", bare.as_str())] {
        let mut c = herald(&server, &["channel", "create", id]);
        c.arg("--api").arg(api);
        let (ok, out, err) = output(c).await;
        assert!(ok, "--api {api}: {err}");
        assert!(out.contains(&format!("created channel {id}")), "{out}");
    }
    // From standard input.
    let mut c = herald(&server, &["post", "a", "-"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from stdin\nsecond line").await.unwrap();
    }
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // From a file too big for a command line argument list? 10 KB is enough
    // to show the path works; the limit is the post size (16 KiB).
    let file = dir.path().join("post.txt");
    let big = "x".repeat(10_000);
    std::fs::write(&file, &big).unwrap();
    let mut c = herald(&server, &["post", "a", "--file"]);
    c.arg(&file);
    let (ok, out, err) = output(c).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    let history = server.api.history("a", 0, 10).await.unwrap();
    assert_eq!(history.posts[0].text, "from stdin\nsecond line");
    assert_eq!(history.posts[1].text, big);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_start_writes_no_secrets_and_errors_say_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let fresh = tempfile::tempdir().unwrap();
    let data = fresh.path().join("data");
    // Its QUIC port is taken (by the test server).
    let (ok, _, err) = output(serve(&data, &server.quic.to_string())).await;
    assert!(!ok);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(err.contains(&server.quic.to_string()), "{err}");
    assert!(
        !data.join("admin.key").exists(),
        "no admin key may be written by a start that failed (it would never be shown)"
    );
    // The first successful start prints the key; `herald admin-key` shows it later.
    let mut child = serve(&data, "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = None;
    while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(k) = line.strip_prefix("admin key: ") {
            printed = Some(k.to_string());
        }
        if line.starts_with("herald listening") {
            break;
        }
    }
    interrupt(&child).await;
    assert!(tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap()
        .success());
    let printed = printed.expect("the first start prints the admin key");
    let mut c = Command::new(HERALD);
    c.args(["admin-key", "--data-dir"]).arg(&data);
    let (ok, out, _) = output(c).await;
    assert!(ok);
    assert_eq!(out.trim(), printed);
    server.stop().await;
}

fn serve(data: &Path, quic: &str) -> Command {
    let mut c = Command::new(HERALD);
    c.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--quic-addr", quic, "--http-addr", "127.0.0.1:0"])
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_ADMIN_KEY")
        .env_remove("HERALD_JWT_SECRET")
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_key_from_the_environment_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let key = "hk_admin_from_the_environment_0123456789";
    let mut c = serve(dir.path(), "127.0.0.1:0");
    c.env("HERALD_ADMIN_KEY", key)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    tokio::time::timeout(WAIT, async {
        while let Some(l) = out.next_line().await.unwrap() {
            printed.push_str(&l);
            printed.push('\n');
            if l.starts_with("herald listening:") {
                return;
            }
        }
        panic!("herald exited before listening: {printed}");
    })
    .await
    .expect("herald starts");
    interrupt(&child).await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    while let Ok(Some(l)) = out.next_line().await {
        printed.push_str(&l);
    }
    let mut logged = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut logged)
        .await
        .unwrap();
    // Other secrets were generated (so "first start" is said), never the key.
    assert!(printed.contains("first start"), "{printed}");
    assert!(!printed.contains(key), "stdout: {printed}");
    assert!(!logged.contains(key), "log: {logged}");
    assert!(!dir.path().join("admin.key").exists());
}
