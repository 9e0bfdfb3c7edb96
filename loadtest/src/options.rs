//! What a run does: how many followers, channels and posts, how fast, and
//! for how long at most. Parsed from the command line by the binary; tests
//! build it with [`Options::small`].

use std::time::Duration;

use serde::Serialize;

/// Which follower engine simulates the followers of a run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// One `herald_client::Client` per follower on shared quinn endpoints:
    /// the reference client, with reconnect and resume (several tokio task
    /// wake-ups per delivered packet).
    Client,
    /// A few OS threads, each an event loop over one UDP socket and its
    /// `quinn_proto` connections, speaking the follower protocol itself
    /// ([`crate::engine`]): no task per follower, batched I/O.
    Loop,
}

/// Run options. Every loop the run makes is bounded by these counts and by
/// `timeout_secs`.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Options {
    /// Follower connections to open.
    #[arg(long, default_value_t = 1000)]
    pub followers: usize,
    /// Client endpoints (UDP sockets) the followers are spread over; with
    /// `--engine loop`, shared out over at most one event-loop thread per
    /// core.
    #[arg(long, default_value_t = 4)]
    pub endpoints: usize,
    /// Follower engine: `loop` (event-loop threads, about 15 µs of
    /// load-generator CPU per delivery) or `client` (a `herald_client`
    /// task per follower, about 30 µs, with reconnect and failover). The
    /// soak always uses `client`.
    #[arg(long, value_enum, default_value_t = Engine::Loop)]
    pub engine: Engine,
    /// Receive and send buffer of each client endpoint, in MiB (forced past
    /// the kernel's cap when run as root): it must hold a fan-out round
    /// until the load generator reads it.
    #[arg(long, default_value_t = 16)]
    pub client_buffer_mib: usize,
    /// New connections per second (0: as fast as `connect_concurrency` allows).
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Channels; follower counts per channel follow a Zipf law (a few huge
    /// channels, a long tail).
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Channels each follower follows (at most `channels`).
    #[arg(long, default_value_t = 2)]
    pub follows: usize,
    /// Zipf exponent of channel popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Posts to publish (round-robin over the channels).
    #[arg(long, default_value_t = 100)]
    pub posts: usize,
    /// Bytes of post text (at least 32, to carry the send timestamp).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Posts per second; 0 publishes everything at once (burst).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Publish requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub publish_concurrency: usize,
    /// Seconds the followers idle after connecting, while the server's idle
    /// CPU is measured.
    #[arg(long, default_value_t = 2.0)]
    pub idle_secs: f64,
    /// Longest the connect phase and the delivery phase may each take, in seconds.
    #[arg(long = "timeout", default_value_t = 120)]
    pub timeout_secs: u64,
    /// Seed of the follower-to-channel assignment.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Also run a promoted campaign: every channel opts in (a slot after
    /// every 5 posts) and the run checks that the impressions the server
    /// reports equal the promoted frames the followers received.
    #[arg(long)]
    pub campaign: bool,
    /// Followers take live posts on the feed stream only: without this,
    /// their Hello asks for live datagrams (docs/protocol.md §8.5) and
    /// posts are ordered across the feed stream and QUIC datagrams, the
    /// gaps asked for again with Resend.
    #[arg(long = "no-live-datagrams", action = clap::ArgAction::SetFalse)]
    pub live_datagrams: bool,
    /// Test knob, `--engine loop` only: each follower drops every Nth live
    /// post that reaches it as a QUIC datagram before looking at it, as if
    /// the network had lost it, so the repair (Resend, Head) is exercised.
    /// 0 (the default) drops none.
    #[arg(long, default_value_t = 0)]
    pub drop_datagrams_every: u32,
}

impl Options {
    /// A small run, for tests (with the default engine, `loop`).
    pub fn small(followers: usize, channels: usize, posts: usize) -> Options {
        Options {
            followers,
            endpoints: 2,
            engine: Engine::Loop,
            client_buffer_mib: 4,
            connect_rate: 0,
            connect_concurrency: 64,
            channels,
            follows: 2,
            zipf: 1.0,
            posts,
            size: 64,
            rate: 0.0,
            publish_concurrency: 16,
            idle_secs: 0.0,
            timeout_secs: 30,
            seed: 1,
            quiet: true,
            campaign: false,
            live_datagrams: true,
            drop_datagrams_every: 0,
        }
    }

    /// The run's time limit per phase.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Checks the options make sense.
    pub fn validate(&self) -> Result<(), crate::LoadError> {
        let bad = |m: &str| Err(crate::LoadError::Options(m.to_string()));
        if self.followers == 0 || self.channels == 0 || self.endpoints == 0 {
            return bad("followers, channels and endpoints must be at least 1");
        }
        if self.follows == 0 {
            return bad("follows must be at least 1");
        }
        if self.size < crate::post_text::MIN_SIZE || self.size > crate::post_text::MAX_SIZE {
            return bad(&format!(
                "size must be between {} and {} bytes",
                crate::post_text::MIN_SIZE,
                crate::post_text::MAX_SIZE
            ));
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return bad("rate must be 0 (burst) or a positive number");
        }
        if !(self.zipf >= 0.0 && self.zipf.is_finite()) {
            return bad("zipf must be a non-negative number");
        }
        if !(self.idle_secs >= 0.0 && self.idle_secs.is_finite()) {
            return bad("idle-secs must be a non-negative number");
        }
        if self.connect_concurrency == 0 || self.publish_concurrency == 0 {
            return bad("concurrency limits must be at least 1");
        }
        if self.drop_datagrams_every > 0 && self.engine != Engine::Loop {
            return bad("drop-datagrams-every works with --engine loop only");
        }
        if self.drop_datagrams_every > 0 && !self.live_datagrams {
            return bad("drop-datagrams-every needs live datagrams (not --no-live-datagrams)");
        }
        Ok(())
    }
}
