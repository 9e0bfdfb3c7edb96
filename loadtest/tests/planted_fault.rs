//! The load tester must catch a server that skips one delivery. The server
//! is built with the test-only `fault-injection` feature and told, through
//! `HERALD_FAULT_SKIP_DELIVERY`, to drop the 7th live post delivery of the
//! process. The counter is process-global, so this test has its own binary
//! and is its only test. The followers take posts on the feed stream only
//! (`--no-live-datagrams`): with live datagrams a skipped live delivery is
//! indistinguishable from a lost datagram, which the protocol repairs
//! (Head, Resend; docs/protocol.md §8.5), so the run would rightly verify.

mod common;

use herald_loadtest::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_delivery_is_reported_and_fails_the_run() {
    // Set before the server delivers anything; read once on first delivery.
    std::env::set_var("HERALD_FAULT_SKIP_DELIVERY", "7");
    let server = common::InProcess::start().await;
    let opts = Options {
        follows: 1,
        timeout_secs: 20,
        live_datagrams: false,
        ..Options::small(50, 2, 10)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(
        !report.verify.ok,
        "the skipped delivery went unnoticed:\n{report}"
    );
    assert_ne!(report.exit_code(), 0);
    assert_eq!(report.verify.missing, 1, "{report}");
    assert_eq!(report.delivery.delivered, report.delivery.expected - 1);
    assert!(report.to_string().contains("FAILED: 1 missing"), "{report}");
    server.shutdown().await;
}
