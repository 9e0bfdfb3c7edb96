//! herald-loadtest as a library: the measurement run, callable in-process by
//! tests and by the `herald-loadtest` binary.
//!
//! A run ([`run()`]) opens N followers spread over K client endpoints at a
//! bounded connect rate, has each follow a few channels picked with a
//! Zipf-skewed popularity ([`plan`]), publishes P posts over the HTTP API at a
//! rate or in a burst ([`publisher`]), and measures what arrives
//! ([`follower`]; with `--engine loop`, by a few event-loop threads instead
//! of a task per follower: [`engine`]). Every post carries its send time, so each delivery gives a
//! publish-to-delivery latency. The run then checks what it measured
//! ([`verify`]): every follower must get every post of its channels exactly
//! once and in order within the timeout. The result is a [`Report`]
//! ([`report`]) whose `verify.ok` says whether the run was clean.
//!
//! `--soak MINUTES` runs [`soak`] instead: followers come and go, posts
//! flow, some followers stall, and the server's memory and CPU are sampled
//! over time.
//!
//! The server is either one this tool started ([`spawn`]; CPU and memory
//! read from `/proc/<pid>`) or a running one (figures read from its
//! `/metrics`), described by a [`Target`].

pub mod campaign;
pub mod endpoints;
pub mod engine;
pub mod follower;
pub mod options;
pub mod plan;
pub mod post_text;
pub mod probe;
pub mod publisher;
pub mod report;
pub mod run;
pub mod soak;
pub mod spawn;
pub mod target;
pub mod verify;

pub use options::Options;
pub use report::Report;
pub use run::{run, run_on};
pub use target::{Node, Target};

/// A run could not be set up or carried out (distinct from a run that
/// completed but found violations, which is a [`Report`] with `verify.ok`
/// false).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("cannot start the server: {0}")]
    Spawn(String),
    #[error("cannot reach the server: {0}")]
    Target(String),
    #[error("HTTP API call failed: {0}")]
    Api(#[from] herald::cli::ApiCallError),
    #[error("client setup failed: {0}")]
    Client(#[from] herald_client::ClientError),
    #[error("cannot start the follower loops: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
