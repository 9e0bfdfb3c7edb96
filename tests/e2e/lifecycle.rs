//! `Server::run` lets go: once it returns, every task it started has ended
//! and every database is closed, so the same data directory opens again at
//! once (no retry), even if followers, idle keep-alive connections and a
//! request stuck half-sent were still there when it was told to stop.

use std::time::Duration;

use herald_server::Server;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_with_the_data_directory_free_to_open_again() {
    let dir = tempfile::tempdir().unwrap();
    for round in 1..=3u64 {
        let server = TestServer::start(dir.path()).await;
        if round == 1 {
            server.api.create_channel("life", "").await.unwrap();
        }
        let seq = server.api.publish("life", "hello").await.unwrap().seq;
        assert_eq!(seq, round, "the log survived the restart");
        // A follower, an idle keep-alive HTTP connection (the API client
        // keeps its connection pooled) and a request whose body never ends.
        let follower = server.client("f").await;
        follower.follow("life").await.unwrap();
        let mut stuck = tokio::net::TcpStream::connect(server.http).await.unwrap();
        stuck
            .write_all(
                b"POST /v1/channels/life/posts HTTP/1.1\r\nhost: x\r\n\
                  content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"te",
            )
            .await
            .unwrap();
        let cfg = config(dir.path());
        server.stop().await;
        // No retry loop: it must open now.
        let again = Server::bind(cfg)
            .await
            .expect("the data directory opens at once");
        drop(again);
        drop((follower, stuck));
    }
}

#[tokio::test]
async fn a_bound_server_that_never_ran_releases_its_files_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::bind(config(dir.path())).await.unwrap();
    // A second server on the same directory is told why it cannot start.
    let err = Server::bind(config(dir.path()))
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("another herald is using the data directory"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("process {}", std::process::id())),
        "{msg}"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), Server::bind(config(dir.path())))
        .await
        .unwrap()
        .expect("opens again");
}
