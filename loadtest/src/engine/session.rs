//! One follower's side of Herald's protocol (docs/protocol.md) on a
//! quinn-proto connection, without async: once connected, open the control
//! stream and send Hello with the follower's token; on Welcome send one
//! Follow per channel (pipelined, matched to their answers by request id)
//! and take each channel's `head_seq` from Followed; once every follow is
//! answered the follower is settled. The server's feed stream is accepted
//! when it appears; its frames, and the live posts that come as QUIC
//! datagrams when Hello asked for them and Welcome granted them
//! (docs/protocol.md §8.5), are decoded as they arrive and handed to the
//! follower's [`Feed`], which orders them and tallies what it releases;
//! the `Resend`s it asks for go out on the control stream, numbered after
//! the Follows, and their `Resent` answers go back to it.
//!
//! The loop owns the connection and calls in here on its stream events; a
//! method's [`Step`] tells the loop when the follower has settled or failed.
//!
//! Bounds: the control bytes not yet taken by the stream are Hello and the
//! Follows (the token and the channel names, written once); the inbound
//! buffers hold at most one frame each ([`FrameBuf`]: 64 KiB on the control
//! stream, `max_feed_frame` on the feed); control answers are at most one
//! per request sent; datagrams are taken as they come (quinn-proto holds
//! at most [`super::DATAGRAM_BUFFER`] bytes of them per connection).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use herald_client::ClientError;
use herald_proto::frame::encode_frame;
use herald_proto::v1 as pb;
use herald_proto::{ErrorCode, FrameError};
use quinn_proto::{Connection, Dir, StreamId, VarInt, WriteError};

use super::feed::{Ctx, Feed};
use super::frames::FrameBuf;
use super::FollowerPlan;
use crate::follower::{ChannelTally, FollowerResult, Shared};

/// Largest control frame accepted (the reference client's limit).
const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Request id of Hello; Follows are numbered after it.
const HELLO_REQUEST_ID: u64 = 1;

/// Why a follower failed or ended; the text is what its result reports,
/// worded as the `client` engine words it.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// The handshake, Hello or Welcome failed.
    #[error("connect: {0}")]
    Connect(ClientError),
    /// A Follow was refused.
    #[error("follow {channel}: {error}")]
    Follow { channel: String, error: ClientError },
    /// The server followed a channel the run did not create.
    #[error("unknown channel {0}")]
    UnknownChannel(String),
    /// The connection of a settled follower ended or broke the protocol.
    #[error("{0}")]
    Ended(ClientError),
}

/// What a call tells the loop.
pub(super) enum Step {
    Continue,
    /// Every follow answered: the follower is connected and following.
    Settled,
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// QUIC/TLS handshake in progress.
    Handshake,
    /// Hello sent (or waiting for the stream to open), Welcome awaited.
    Welcome,
    /// Follows sent, answers awaited.
    Following,
    /// Settled: tallying the feed.
    Live,
}

pub(super) struct Session {
    pub(super) phase: Phase,
    ctl: Option<StreamId>,
    /// Control bytes not yet taken by the stream.
    ctl_out: Vec<u8>,
    ctl_in: FrameBuf,
    feed: Option<StreamId>,
    feed_in: FrameBuf,
    /// Follows sent and not answered: (request id, index in the plan's channels).
    follows: Vec<(u64, usize)>,
    /// Hello asks for live datagrams.
    live_datagrams: bool,
    /// Largest feed frame accepted (a datagram's too).
    max_feed_frame: usize,
    /// Ordering and tallying of what the feed stream and datagrams bring.
    posts: Feed,
    /// The request id of the next `Resend`.
    next_id: u64,
}

impl Session {
    /// A session whose Hello asks for live datagrams if `live_datagrams`;
    /// `drop_datagrams_every` is the test knob of [`Feed`].
    pub(super) fn new(
        max_feed_frame: usize,
        live_datagrams: bool,
        drop_datagrams_every: u32,
    ) -> Session {
        Session {
            phase: Phase::Handshake,
            ctl: None,
            ctl_out: Vec::new(),
            ctl_in: FrameBuf::new(MAX_CONTROL_FRAME),
            feed: None,
            feed_in: FrameBuf::new(max_feed_frame),
            follows: Vec::new(),
            live_datagrams,
            max_feed_frame,
            posts: Feed::new(drop_datagrams_every),
            next_id: HELLO_REQUEST_ID + 1,
        }
    }

    /// Whether the follower is still connecting (handshake to last Followed).
    pub(super) fn connecting(&self) -> bool {
        self.phase != Phase::Live
    }

    /// A failure at this point of the session, from a connection error.
    pub(super) fn failure(&self, err: ClientError, server: SocketAddr) -> Failure {
        match self.phase {
            Phase::Live => Failure::Ended(err),
            _ => Failure::Connect(match err {
                ClientError::Connect(m) => ClientError::Connect(format!("{server}: {m}")),
                other => other,
            }),
        }
    }

    /// The handshake is done: open the control stream and say Hello.
    pub(super) fn on_connected(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        client_name: &str,
    ) -> Step {
        self.phase = Phase::Welcome;
        let hello = pb::ClientFrame {
            request_id: HELLO_REQUEST_ID,
            kind: Some(pb::client_frame::Kind::Hello(pb::Hello {
                token: plan.token.clone(),
                client_name: client_name.to_string(),
                // No Seen: the server counts an impression when it sends.
                receipts: false,
                live_datagrams: self.live_datagrams,
            })),
        };
        self.ctl_out.extend_from_slice(&encode_frame(&hello));
        self.open_control(conn)
    }

    /// Opens the control stream if not yet open and the server allows it
    /// (it grants one bidirectional stream), and writes what is queued.
    pub(super) fn open_control(&mut self, conn: &mut Connection) -> Step {
        if self.ctl.is_none() && self.phase != Phase::Handshake {
            self.ctl = conn.streams().open(Dir::Bi);
        }
        self.write_control(conn)
    }

    /// Writes queued control bytes as far as the stream takes them; the
    /// rest goes when it is writable again.
    pub(super) fn write_control(&mut self, conn: &mut Connection) -> Step {
        let Some(id) = self.ctl else {
            return Step::Continue;
        };
        while !self.ctl_out.is_empty() {
            match conn.send_stream(id).write(&self.ctl_out) {
                Ok(0) | Err(WriteError::Blocked) => break,
                Ok(n) => {
                    self.ctl_out.drain(..n);
                }
                Err(e) => {
                    let err = ClientError::Connect(format!("control stream: {e}"));
                    return Step::Failed(match self.phase {
                        Phase::Live => Failure::Ended(err),
                        _ => Failure::Connect(err),
                    });
                }
            }
        }
        if self.ctl_out.is_empty() && self.ctl_out.capacity() > 0 {
            self.ctl_out = Vec::new();
        }
        Step::Continue
    }

    /// Takes the server's feed stream (the first unidirectional one) and
    /// stops any other, then reads what it already holds.
    pub(super) fn accept_feed(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
    ) -> Step {
        while let Some(id) = conn.streams().accept(Dir::Uni) {
            if self.feed.is_none() {
                self.feed = Some(id);
            } else {
                let _ = conn.recv_stream(id).stop(VarInt::from_u32(0));
            }
        }
        self.read_feed(conn, plan, shared, out)
    }

    /// Stream `id` has bytes to read.
    pub(super) fn on_readable(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
        now: Instant,
    ) -> Step {
        if self.feed == Some(id) {
            self.read_feed(conn, plan, shared, out)
        } else if self.ctl == Some(id) {
            self.read_control(conn, plan, shared, out, now)
        } else {
            Step::Continue
        }
    }

    /// QUIC datagrams came: takes every one the connection holds.
    pub(super) fn on_datagrams(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
    ) {
        let mut cx = Ctx { plan, shared, out };
        while let Some(d) = conn.datagrams().recv() {
            self.posts.datagram(&d, self.max_feed_frame, &mut cx);
        }
    }

    /// Sends the `Resend`s the feed asks for now (after frames came, or at
    /// its retry time, [`Session::retry_at`]).
    pub(super) fn poll(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
        now: Instant,
    ) -> Step {
        if !matches!(self.phase, Phase::Following | Phase::Live) {
            return Step::Continue;
        }
        let mut cx = Ctx { plan, shared, out };
        if self
            .posts
            .poll_resends(now, &mut self.next_id, &mut self.ctl_out, &mut cx)
        {
            self.write_control(conn)
        } else {
            Step::Continue
        }
    }

    /// When [`Session::poll`] may have a `Resend` to send that it has not now.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.posts.retry_at()
    }

    fn protocol(&self, e: FrameError) -> Step {
        let err = ClientError::Protocol(e.to_string());
        Step::Failed(match self.phase {
            Phase::Live => Failure::Ended(err),
            _ => Failure::Connect(err),
        })
    }

    fn read_feed(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
    ) -> Step {
        let Some(id) = self.feed else {
            return Step::Continue;
        };
        let mut cx = Ctx { plan, shared, out };
        let posts = &mut self.posts;
        let failed = read_frames(conn, id, &mut self.feed_in, |f: pb::FeedFrame| {
            posts.frame(f, &mut cx)
        });
        match failed {
            Some(e) => self.protocol(e),
            None => Step::Continue,
        }
    }

    fn read_control(
        &mut self,
        conn: &mut Connection,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
        now: Instant,
    ) -> Step {
        let Some(id) = self.ctl else {
            return Step::Continue;
        };
        // Answers are collected first (the stream borrows the connection),
        // at most one per request sent.
        let mut frames = Vec::new();
        let failed = read_frames(conn, id, &mut self.ctl_in, |f: pb::ServerFrame| {
            frames.push(f)
        });
        let mut step = Step::Continue;
        for f in frames {
            match self.on_control(conn, f, plan, shared, out, now) {
                Step::Continue => {}
                Step::Settled => step = Step::Settled,
                failed @ Step::Failed(_) => return failed,
            }
        }
        match failed {
            Some(e) => self.protocol(e),
            None => step,
        }
    }

    fn on_control(
        &mut self,
        conn: &mut Connection,
        f: pb::ServerFrame,
        plan: &FollowerPlan,
        shared: &Shared,
        out: &mut FollowerResult,
        now: Instant,
    ) -> Step {
        use pb::server_frame::Kind;
        match (self.phase, f.kind) {
            (Phase::Welcome, Some(Kind::Welcome(w))) => {
                self.phase = Phase::Following;
                self.posts
                    .welcome(w.live_datagrams && self.live_datagrams, plan.channels.len());
                for (i, channel) in plan.channels.iter().enumerate() {
                    let id = self.next_id;
                    self.next_id += 1;
                    let frame = pb::ClientFrame {
                        request_id: id,
                        kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
                            channel: channel.clone(),
                            after_seq: None,
                            epoch: None,
                            tail: 0,
                        })),
                    };
                    self.ctl_out.extend_from_slice(&encode_frame(&frame));
                    self.follows.push((id, i));
                }
                if self.follows.is_empty() {
                    self.phase = Phase::Live;
                    return Step::Settled;
                }
                self.write_control(conn)
            }
            (Phase::Welcome, Some(Kind::Error(e))) => {
                Step::Failed(Failure::Connect(ClientError::Refused {
                    code: ErrorCode::from_u32(e.code),
                    message: e.message,
                }))
            }
            (Phase::Welcome, _) => Step::Failed(Failure::Connect(ClientError::Protocol(
                "expected Welcome".into(),
            ))),
            (Phase::Following, Some(Kind::Followed(fd))) => {
                let Some(k) = self.follows.iter().position(|(id, _)| *id == f.request_id) else {
                    return Step::Continue;
                };
                let (_, i) = self.follows.swap_remove(k);
                let name = plan.channels.get(i).map_or("", String::as_str);
                let Some(&channel) = shared.channel_index.get(name) else {
                    return Step::Failed(Failure::UnknownChannel(name.to_string()));
                };
                out.channels.push(ChannelTally {
                    channel,
                    start: fd.head_seq,
                    last: fd.head_seq,
                    ..ChannelTally::default()
                });
                self.posts
                    .followed(i, fd.head_seq, fd.epoch, &mut Ctx { plan, shared, out });
                if self.follows.is_empty() {
                    self.phase = Phase::Live;
                    Step::Settled
                } else {
                    Step::Continue
                }
            }
            (_, Some(Kind::Resent(_))) => {
                self.posts.resent(f.request_id, now);
                Step::Continue
            }
            (_, Some(Kind::Error(e))) if self.posts.resent(f.request_id, now) => {
                // Asked again after the retry time if the gap is still there.
                tracing::debug!(code = e.code, message = %e.message, "resend refused");
                Step::Continue
            }
            (phase, Some(Kind::Error(e))) => {
                let answered = self.follows.iter().position(|(id, _)| *id == f.request_id);
                match answered {
                    Some(k) if phase == Phase::Following => {
                        let (_, i) = self.follows.swap_remove(k);
                        Step::Failed(Failure::Follow {
                            channel: plan.channels.get(i).cloned().unwrap_or_default(),
                            error: ClientError::Request {
                                code: ErrorCode::from_u32(e.code),
                                message: e.message,
                            },
                        })
                    }
                    _ => {
                        out.errors += 1;
                        out.error.get_or_insert(e.message);
                        Step::Continue
                    }
                }
            }
            _ => Step::Continue,
        }
    }
}

/// The close reason the loop sends when it ends a follower's connection.
pub(super) const BYE: &[u8] = b"bye";

/// [`BYE`] as the close reason quinn-proto takes.
/// Reads stream `id` through `buf` until it is blocked, finished or reset
/// (the connection's close follows the last two), handing each whole frame
/// to `each`; stops at the first bad frame and returns its error. The
/// transmits the read releases (window updates) are polled by the loop
/// after the caller returns.
fn read_frames<M: prost::Message + Default>(
    conn: &mut Connection,
    id: StreamId,
    buf: &mut FrameBuf,
    mut each: impl FnMut(M),
) -> Option<FrameError> {
    let mut stream = conn.recv_stream(id);
    let Ok(mut chunks) = stream.read(true) else {
        return None;
    };
    let mut failed = None;
    'read: while let Ok(Some(c)) = chunks.next(buf.room()) {
        buf.push(&c.bytes);
        loop {
            match buf.next::<M>() {
                Ok(Some(f)) => each(f),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break 'read;
                }
            }
        }
    }
    let _ = chunks.finalize();
    failed
}

pub(super) fn bye() -> Bytes {
    Bytes::from_static(BYE)
}
