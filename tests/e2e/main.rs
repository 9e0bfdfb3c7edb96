//! End-to-end tests: a real server on 127.0.0.1 port 0, real QUIC through the
//! public client library, real HTTP. One test binary (linking the whole
//! server once), one module per promise; the shared set-up is [`harness`].

mod harness;

mod nats_cluster;

mod bad_input;
mod brand_api;
mod cli;
mod cluster;
mod crash;
mod damaged_files;
mod datagrams;
mod edits_under_lag;
mod fanout;
mod follower_auth;
mod http_limits;
mod lagging;
mod lifecycle;
mod metrics;
mod netem;
mod promo;
mod promo_crash;
mod quic_flood;
mod resume;
mod slow_follower;
mod storage_faults;
