//! Unit tests of the placement and accounting rules.

use std::sync::Arc;

use super::*;
use crate::feed::Impression;
use crate::model::Media;

fn ch(s: &str) -> ChannelId {
    ChannelId::parse(s).unwrap()
}

fn campaign(id: &str, bid: u64, budget: u64) -> Campaign {
    let now = now_ms();
    Campaign {
        id: id.into(),
        advertiser: "acme".into(),
        creative: Creative {
            title: "Title".into(),
            text: "Text".into(),
            media: Some(Media {
                url: "https://cdn/x.png".into(),
                mime: "image/png".into(),
            }),
            cta_url: "https://example.com".into(),
        },
        targeting: Targeting::default(),
        budget_impressions: budget,
        cpm_bid_micros: bid,
        frequency_cap: None,
        start_ms: now - 1000,
        // A flight that is almost over, so pacing allows the whole budget.
        end_ms: now + 60_000,
        status: State::Active,
        created_at_ms: now,
    }
}

fn setup() -> (tempfile::TempDir, Arc<Promo>) {
    let dir = tempfile::tempdir().unwrap();
    let p = Promo::open(dir.path()).unwrap();
    p.set_channel(
        "a",
        ChannelSlot {
            opt_in: true,
            every_posts: 5,
        },
    )
    .unwrap();
    (dir, p)
}

fn paced_out(mut c: Campaign) -> Campaign {
    // Make the flight mostly elapsed so pacing does not limit the test.
    c.start_ms = now_ms() - 1_000_000_000;
    c
}

/// A paced-out campaign shown at most `impressions` times an hour per
/// follower.
fn capped(id: &str, budget: u64, impressions: u32) -> Campaign {
    let mut c = paced_out(campaign(id, 1000, budget));
    c.frequency_cap = Some(FrequencyCap {
        impressions,
        period_secs: 3600,
    });
    c
}

fn winner(ev: &Arc<FeedEvent>) -> String {
    ev.slot.as_ref().unwrap().campaign_id().to_string()
}

#[test]
fn slot_opens_once_every_n_posts_and_only_when_opted_in() {
    let (_d, p) = setup();
    p.create(paced_out(campaign("c1", 1000, 1_000_000)))
        .unwrap();
    let opened: Vec<u64> = (1..=20)
        .filter(|s| p.after_post(&ch("a"), *s, 10).is_some())
        .collect();
    assert_eq!(opened, vec![5, 10, 15, 20]);
    // Not opted in: never.
    assert!((1..=20).all(|s| p.after_post(&ch("b"), s, 10).is_none()));
    p.set_channel(
        "a",
        ChannelSlot {
            opt_in: false,
            every_posts: 5,
        },
    )
    .unwrap();
    assert!(p.after_post(&ch("a"), 25, 10).is_none());
}

#[test]
fn highest_eligible_bid_wins() {
    let (_d, p) = setup();
    p.create(paced_out(campaign("low", 1_000, 1000))).unwrap();
    p.create(paced_out(campaign("high", 5_000, 1000))).unwrap();
    let mut paused = paused_campaign("paused_richest");
    paused.cpm_bid_micros = 9_000;
    p.create(paused).unwrap();
    let mut elsewhere = paced_out(campaign("elsewhere", 8_000, 1000));
    elsewhere.targeting.channels = vec!["other".into()];
    p.create(elsewhere).unwrap();
    let ev = p.after_post(&ch("a"), 5, 3).unwrap();
    assert_eq!(winner(&ev), "high");
    assert_eq!(ev.kind, EventKind::Promoted);
    drop(ev);
    // Once "high" is exhausted, "low" wins.
    p.update("high", |c| c.budget_impressions = 1).unwrap();
    let ev = p.after_post(&ch("a"), 10, 3).unwrap();
    assert_eq!(winner(&ev), "high");
    let claim = ev.slot.as_ref().unwrap().claim("f1", false).unwrap();
    claim.confirm();
    drop(ev);
    let ev = p.after_post(&ch("a"), 15, 3).unwrap();
    assert_eq!(winner(&ev), "low");
}

fn paused_campaign(id: &str) -> Campaign {
    let mut c = paced_out(campaign(id, 1, 1000));
    c.status = State::Paused;
    c
}

#[test]
fn flight_window_is_respected() {
    let (_d, p) = setup();
    let mut future = campaign("future", 1000, 100);
    future.start_ms = now_ms() + 60_000;
    future.end_ms = now_ms() + 120_000;
    p.create(future).unwrap();
    let mut past = campaign("past", 1000, 100);
    past.start_ms = now_ms() - 120_000;
    past.end_ms = now_ms() - 60_000;
    p.create(past).unwrap();
    assert!(p.after_post(&ch("a"), 5, 3).is_none());
    assert_eq!(p.get("past").unwrap().1, State::Finished);
}

#[test]
fn pacing_limits_what_one_slot_reserves() {
    let (_d, p) = setup();
    let mut c = campaign("paced", 1000, 1000);
    c.start_ms = now_ms();
    c.end_ms = now_ms() + 10 * 24 * 3600 * 1000;
    p.create(c).unwrap();
    // At the start of a 10-day flight only the slack (a tenth) may be used.
    let ev = p.after_post(&ch("a"), 5, 500).unwrap();
    assert_eq!(ev.slot.as_ref().unwrap().remaining(), 100);
    assert!(
        p.after_post(&ch("a"), 10, 500).is_none(),
        "allowance used up by the open slot"
    );
    drop(ev);
    assert_eq!(
        p.get("paced").unwrap().2.reserved,
        0,
        "unclaimed reservation returned"
    );
}

#[test]
fn frequency_cap_holds_per_follower() {
    let (_d, p) = setup();
    p.create(capped("capped", 1000, 2)).unwrap();
    let mut shown = std::collections::HashMap::new();
    for s in 1..=5u64 {
        let ev = p.after_post(&ch("a"), s * 5, 2).unwrap();
        for f in ["f1", "f2"] {
            if let Some(claim) = ev.slot.as_ref().unwrap().claim(f, false) {
                claim.confirm();
                *shown.entry(f).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(shown["f1"], 2);
    assert_eq!(shown["f2"], 2);
    let stats = p.get("capped").unwrap().2;
    assert_eq!((stats.impressions, stats.reach, stats.reserved), (4, 2, 0));
}

#[test]
fn unconfirmed_claims_release_budget_and_cap() {
    let (_d, p) = setup();
    p.create(capped("c", 10, 1)).unwrap();
    let ev = p.after_post(&ch("a"), 5, 1).unwrap();
    let claim = ev.slot.as_ref().unwrap().claim("f", false).unwrap();
    drop(claim); // the write failed
    drop(ev);
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reserved), (0, 0));
    // The cap was not used up by the failed delivery.
    let ev = p.after_post(&ch("a"), 10, 1).unwrap();
    assert!(ev.slot.as_ref().unwrap().claim("f", false).is_some());
}

#[test]
fn a_counted_claim_whose_write_failed_is_taken_back() {
    let (_d, p) = setup();
    p.create(capped("c", 10, 1)).unwrap();
    let ev = p.after_post(&ch("a"), 5, 1).unwrap();
    let mut claim = ev.slot.as_ref().unwrap().claim("f", false).unwrap();
    claim.count();
    claim.count();
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reach), (1, 1), "counted once");
    assert_eq!(p.channel("a").1, 1);
    claim.uncount();
    drop(claim);
    drop(ev);
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reserved, s.reach), (0, 0, 0));
    assert_eq!(p.channel("a").1, 0);
    // Neither the cap nor a click is used up by it.
    assert!(!p.click("f", "c").unwrap());
    let ev = p.after_post(&ch("a"), 10, 1).unwrap();
    assert!(ev.slot.as_ref().unwrap().claim("f", false).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_waits_for_a_write_that_covers_the_counts() {
    let (dir, p) = setup();
    p.create(paced_out(campaign("c", 1000, 10))).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let flusher = tokio::spawn(p.clone().run_flusher(stop.clone()));
    let ev = p.after_post(&ch("a"), 5, 2).unwrap();
    for f in ["x", "y"] {
        ev.slot.as_ref().unwrap().claim(f, false).unwrap().confirm();
    }
    p.durable().await.unwrap();
    // On disk already: a copy of the file opened now shows them.
    stop.cancel();
    flusher.await.unwrap();
    p.close().await;
    drop(ev);
    drop(p);
    let again = Promo::open(dir.path()).unwrap();
    assert_eq!(again.get("c").unwrap().2.impressions, 2);
}

#[test]
fn follower_entries_of_campaigns_long_over_are_pruned() {
    let (dir, p) = setup();
    let c = paced_out(campaign("c", 1000, 10));
    let end = c.end_ms;
    p.create(c).unwrap();
    p.create(paced_out(campaign("live", 10, 10))).unwrap();
    let ev = p.after_post(&ch("a"), 5, 2).unwrap();
    for f in ["x", "y"] {
        ev.slot.as_ref().unwrap().claim(f, false).unwrap().confirm();
    }
    drop(ev);
    assert!(p.click("x", "c").unwrap());
    p.flush().unwrap();
    assert_eq!(p.follower_entries(), 3);
    // Within the grace after the flight: kept (a late click still counts).
    assert_eq!(p.prune_ended(end + 1000), 0);
    let later = end + FOLLOWER_STATE_GRACE_MS + 1;
    assert_eq!(p.prune_ended(later), 3);
    assert_eq!(p.follower_entries(), 0);
    assert_eq!(p.prune_ended(later), 0, "once");
    p.flush().unwrap();
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.clicks, s.reach), (2, 1, 2), "totals stay");
    drop(p);
    // Gone from the file too.
    let again = Promo::open(dir.path()).unwrap();
    assert_eq!(again.follower_entries(), 0);
    assert_eq!(again.get("c").unwrap().2.impressions, 2);
}

#[test]
fn budget_is_never_overspent_under_concurrent_fanouts() {
    let (_d, p) = setup();
    p.create(paced_out(campaign("b", 1000, 1000))).unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let p = p.clone();
            s.spawn(move || {
                for round in 0..20u64 {
                    let seq = (t * 1000 + round + 1) * 5;
                    let Some(ev) = p.after_post(&ch("a"), seq, 300) else {
                        continue;
                    };
                    let mut claims = Vec::new();
                    for f in 0..300 {
                        if let Some(c) = ev
                            .slot
                            .as_ref()
                            .unwrap()
                            .claim(&format!("f{t}-{round}-{f}"), false)
                        {
                            claims.push(c);
                        }
                    }
                    // Half the deliveries fail, half are written.
                    let keep = claims.len().div_ceil(2);
                    claims.truncate(keep);
                    claims.into_iter().for_each(|c| c.confirm());
                    let s = p.get("b").unwrap().2;
                    assert!(s.impressions + s.reserved <= 1000, "{s:?}");
                }
            });
        }
    });
    let s = p.get("b").unwrap().2;
    assert_eq!(s.impressions, 1000, "{s:?}");
    assert_eq!(s.reserved, 0);
    assert_eq!(p.get("b").unwrap().1, State::Exhausted);
}

#[test]
fn counts_and_clicks_survive_reopen_and_clicks_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = Promo::open(dir.path()).unwrap();
        p.set_channel(
            "a",
            ChannelSlot {
                opt_in: true,
                every_posts: 5,
            },
        )
        .unwrap();
        p.create(paced_out(campaign("k", 2_000_000, 100))).unwrap();
        let ev = p.after_post(&ch("a"), 5, 3).unwrap();
        let claims: Vec<Box<dyn Impression>> = ["x", "y", "z"]
            .iter()
            .filter_map(|f| ev.slot.as_ref().unwrap().claim(f, false))
            .collect();
        claims.into_iter().for_each(|c| c.confirm());
        assert!(p.click("x", "k").unwrap());
        assert!(!p.click("x", "k").unwrap(), "second click is not counted");
        assert!(!p.click("never-shown", "k").unwrap());
        assert!(p.click("x", "nope").is_err());
        p.flush().unwrap();
    }
    let p = Promo::open(dir.path()).unwrap();
    let (_, _, s) = p.get("k").unwrap();
    assert_eq!(
        (s.impressions, s.clicks, s.reach, s.spend_micros),
        (3, 1, 3, 6_000)
    );
    assert_eq!(
        p.channel("a"),
        (
            ChannelSlot {
                opt_in: true,
                every_posts: 5
            },
            3
        )
    );
    assert!(!p.click("x", "k").unwrap(), "click dedupe survives restart");
    assert!(p.click("y", "k").unwrap());
}

/// A campaign's allocated impressions and each node's share of them.
type Allocation = (u64, std::collections::HashMap<String, u64>);

/// A store shared by several in-process "nodes": the budget ledger of the
/// cluster store (leases with a ceiling), specs and counts in memory.
#[derive(Default)]
struct SharedBudget {
    /// campaign -> allocation
    budget: Mutex<std::collections::HashMap<String, Allocation>>,
    campaigns: Mutex<Vec<Campaign>>,
    /// (campaign, node) -> impressions flushed
    counts: Mutex<std::collections::HashMap<(String, String), u64>>,
}

struct FakeNode {
    node: String,
    shared: Arc<SharedBudget>,
}

impl store::PromoStore for FakeNode {
    fn put_campaign(&self, rec: &CampaignRecord, _new: bool) -> Result<(), LedgerError> {
        let mut c = self.shared.campaigns.lock().unwrap();
        c.retain(|x| x.id != rec.campaign.id);
        c.push(rec.campaign.clone());
        Ok(())
    }
    fn put_channel(&self, _: &str, _: &ChannelRecord) -> Result<(), LedgerError> {
        Ok(())
    }
    fn write(&self, batch: &Batch) -> Result<(), LedgerError> {
        for r in &batch.campaigns {
            self.shared
                .counts
                .lock()
                .unwrap()
                .insert((r.campaign.id.clone(), self.node.clone()), r.impressions);
        }
        Ok(())
    }
    fn shared(&self) -> Option<&dyn store::SharedPromo> {
        Some(self)
    }
}

impl store::SharedPromo for FakeNode {
    fn lease(&self, campaign: &str, budget: u64, want: u64) -> Result<u64, LedgerError> {
        let mut b = self.shared.budget.lock().unwrap();
        let e = b.entry(campaign.to_string()).or_default();
        let n = want.min(budget.saturating_sub(e.0));
        e.0 += n;
        *e.1.entry(self.node.clone()).or_default() += n;
        Ok(n)
    }
    fn give_back(&self, campaign: &str, n: u64) -> Result<u64, LedgerError> {
        let mut b = self.shared.budget.lock().unwrap();
        let e = b.entry(campaign.to_string()).or_default();
        let mine = e.1.entry(self.node.clone()).or_default();
        let back = n.min(*mine);
        *mine -= back;
        e.0 -= back;
        Ok(back)
    }
    fn remote(&self) -> store::Remote {
        let mut r = store::Remote {
            campaigns: self.shared.campaigns.lock().unwrap().clone(),
            ..Default::default()
        };
        for ((c, node), n) in self.shared.counts.lock().unwrap().iter() {
            if *node != self.node {
                r.campaign_counts.entry(c.clone()).or_default().0 += n;
            }
        }
        r
    }
}

#[test]
fn leased_budgets_are_never_exceeded_by_several_nodes() {
    let shared = Arc::new(SharedBudget::default());
    let nodes: Vec<Arc<Promo>> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            let p = Promo::with_store(
                Box::new(FakeNode {
                    node: n.to_string(),
                    shared: shared.clone(),
                }),
                ledger::Loaded::default(),
            );
            p.channels.insert(
                "a".into(),
                Arc::new(ChannelLive {
                    settings: RwLock::new(ChannelSlot {
                        opt_in: true,
                        every_posts: 1,
                    }),
                    ..Default::default()
                }),
            );
            p
        })
        .collect();
    nodes[0]
        .create(paced_out(campaign("c", 1000, 1000)))
        .unwrap();
    let mut shown = 0u64;
    for round in 0..200u64 {
        for (i, p) in nodes.iter().enumerate() {
            p.flush().unwrap();
            p.sync().unwrap();
            // Without a lease nothing can be reserved.
            let Some(ev) = p.after_post(&ch("a"), round + 1, 40) else {
                continue;
            };
            let slot = ev.slot.as_ref().unwrap();
            for f in 0..40 {
                let Some(c) = slot.claim(&format!("{i}-{round}-{f}"), false) else {
                    break;
                };
                // Some claims are never written (a closed stream): they
                // go back to the lease, not to a count.
                if f % 7 == 0 {
                    drop(c);
                } else {
                    c.confirm();
                    shown += 1;
                }
            }
        }
    }
    for p in &nodes {
        p.flush().unwrap();
        p.release_leases().unwrap();
    }
    assert!(shown <= 1000, "shown {shown} of a 1000 budget");
    assert!(shown >= 900, "the budget is (nearly) spent: {shown}");
    let counted: u64 = shared.counts.lock().unwrap().values().sum();
    assert_eq!(
        counted, shown,
        "each impression counted once, over the nodes"
    );
    let allocated = shared.budget.lock().unwrap()["c"].0;
    assert_eq!(allocated, shown, "unused leases were given back");
    for p in &nodes {
        p.sync().unwrap();
        assert_eq!(
            p.get("c").unwrap().2.impressions,
            shown,
            "every node sees the sum"
        );
    }
}

/// The receipt a claim's own frame carries.
fn receipt_of(claim: &dyn Impression) -> u64 {
    let frame = claim
        .frame()
        .expect("a claim with receipts has its own frame");
    let mut buf = &frame[..];
    let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
    let f: herald_proto::v1::FeedFrame = prost::Message::decode(&buf[..len]).unwrap();
    match f.kind {
        Some(herald_proto::v1::feed_frame::Kind::Promoted(p)) => {
            assert_eq!(p.campaign_id, "c");
            p.receipt
        }
        other => panic!("not a promoted frame: {other:?}"),
    }
}

#[test]
fn with_receipts_an_impression_counts_when_its_receipt_arrives() {
    let (_d, p) = setup();
    p.create(paced_out(campaign("c", 1000, 10))).unwrap();
    let ev = p.after_post(&ch("a"), 5, 2).unwrap();
    let slot = ev.slot.as_ref().unwrap();
    // Without receipts: the shared frame, counted when written.
    let plain = slot.claim("old", false).unwrap();
    assert!(plain.frame().is_none());
    plain.confirm();
    let claim = slot.claim("f", true).unwrap();
    let receipt = receipt_of(claim.as_ref());
    assert_ne!(receipt, 0);
    claim.confirm();
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reserved, s.awaiting_receipt), (1, 1, 1));
    assert_eq!(p.channel("a").1, 1);
    // Only the follower it was written to can confirm it, once.
    assert_eq!(p.settle("someone-else", &[receipt]), 0);
    assert_eq!(p.settle("f", &[receipt, receipt + 999]), 1);
    assert_eq!(p.settle("f", &[receipt]), 0, "counted once");
    drop(ev);
    let s = p.get("c").unwrap().2;
    assert_eq!(
        (s.impressions, s.reserved, s.awaiting_receipt, s.reach),
        (2, 0, 0, 2)
    );
    assert_eq!(p.channel("a").1, 2);
    // A click needs the impression counted: it is now.
    assert!(p.click("f", "c").unwrap());
}

#[test]
fn a_receipt_that_never_comes_gives_the_impression_back() {
    let (_d, p) = setup();
    p.create(capped("c", 10, 1)).unwrap();
    p.set_receipt_window(Duration::from_secs(5));
    let ev = p.after_post(&ch("a"), 5, 1).unwrap();
    let claim = ev.slot.as_ref().unwrap().claim("f", true).unwrap();
    let receipt = receipt_of(claim.as_ref());
    claim.confirm();
    drop(ev);
    // The cap holds while it waits.
    let ev = p.after_post(&ch("a"), 10, 1).unwrap();
    assert!(ev.slot.as_ref().unwrap().claim("f", true).is_none());
    drop(ev);
    assert_eq!(p.expire_receipts(now_ms()), 0, "not overdue yet");
    assert_eq!(p.expire_receipts(now_ms() + 5_001), 1);
    let s = p.get("c").unwrap().2;
    assert_eq!(
        (s.impressions, s.reserved, s.awaiting_receipt, s.reach),
        (0, 0, 0, 0)
    );
    assert_eq!(p.settle("f", &[receipt]), 0, "too late");
    // The cap is free again.
    let ev = p.after_post(&ch("a"), 15, 1).unwrap();
    assert!(ev.slot.as_ref().unwrap().claim("f", true).is_some());
}

#[test]
fn a_receipt_claim_whose_write_failed_awaits_nothing() {
    let (_d, p) = setup();
    p.create(paced_out(campaign("c", 1000, 10))).unwrap();
    let ev = p.after_post(&ch("a"), 5, 1).unwrap();
    let mut claim = ev.slot.as_ref().unwrap().claim("f", true).unwrap();
    let receipt = receipt_of(claim.as_ref());
    claim.count();
    assert_eq!(p.awaiting_receipts(), 1);
    claim.uncount();
    drop(claim);
    drop(ev);
    assert_eq!(p.awaiting_receipts(), 0);
    assert_eq!(p.settle("f", &[receipt]), 0);
    let s = p.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reserved, s.awaiting_receipt), (0, 0, 0));
}

#[test]
fn impressions_awaiting_receipt_survive_a_restart() {
    let (dir, p) = setup();
    p.create(paced_out(campaign("c", 1000, 10))).unwrap();
    let ev = p.after_post(&ch("a"), 5, 3).unwrap();
    let mut receipts = Vec::new();
    for f in ["x", "y", "z"] {
        let claim = ev.slot.as_ref().unwrap().claim(f, true).unwrap();
        receipts.push(receipt_of(claim.as_ref()));
        claim.confirm();
    }
    // "x" confirms before the crash; "y" and "z" after it.
    assert_eq!(p.settle("x", &receipts[..1]), 1);
    p.flush().unwrap();
    drop(ev);
    drop(p);
    let again = Promo::open(dir.path()).unwrap();
    let s = again.get("c").unwrap().2;
    assert_eq!((s.impressions, s.reserved, s.awaiting_receipt), (1, 2, 2));
    assert_eq!(again.settle("y", &receipts[1..2]), 1);
    // Receipts handed out now do not collide with the loaded ones.
    let ev = again.after_post(&ch("a"), 10, 1).unwrap();
    let claim = ev.slot.as_ref().unwrap().claim("w", true).unwrap();
    assert!(receipt_of(claim.as_ref()) > receipts[2]);
    drop(claim);
    drop(ev);
    // "z" never comes back: once the window is over, it is given back.
    again.set_receipt_window(Duration::from_millis(1));
    assert_eq!(again.expire_receipts(now_ms() + 10), 1);
    again.flush().unwrap();
    drop(again);
    let last = Promo::open(dir.path()).unwrap();
    let s = last.get("c").unwrap().2;
    assert_eq!(
        (s.impressions, s.reserved, s.awaiting_receipt, s.reach),
        (2, 0, 0, 2)
    );
}
