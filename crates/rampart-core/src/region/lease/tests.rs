use proptest::prelude::*;

use super::*;
use crate::region::takeover::{Campaign, Step};

const LEASE_MS: u64 = 5_000;

fn renewal(holder: &mut Holder, now_ms: u64) -> Renewal {
    holder.renewal(now_ms, 0)
}

fn lost() -> VoteFacts<'static> {
    VoteFacts {
        primary_lost: true,
        better: None,
    }
}

fn vote(epoch: u64, candidate: &str, kind: VoteKind) -> VoteRequest {
    VoteRequest {
        epoch,
        candidate: candidate.into(),
        revision: 0,
        kind,
    }
}

#[test]
fn a_holder_acknowledges_only_while_a_majority_grants_counted_from_when_it_asked() {
    let mut holder = Holder::new("a", 1, LEASE_MS, majority(3), 1);
    assert!(!holder.may_acknowledge(0), "no grant yet");
    let asked = renewal(&mut holder, 1_000);
    holder.granted("a", asked.seq);
    assert!(!holder.may_acknowledge(1_010), "its own region is one of three");
    holder.granted("w", asked.seq);
    let until = 1_000 + holder_counts_ms(LEASE_MS);
    assert_eq!(holder.valid_until_ms(), Some(until));
    assert!(holder.may_acknowledge(until - 1));
    assert!(
        !holder.may_acknowledge(until),
        "read-only on its own, before any grant ends"
    );
    holder.granted("b", 999);
    assert_eq!(
        holder.valid_until_ms(),
        Some(until),
        "an answer to nothing it asked counts for nothing"
    );
}

#[test]
fn a_grantor_promises_each_epoch_once_and_never_goes_back() {
    let mut grantor = Grantor::new(0, None, LEASE_MS);
    let mut a = Holder::new("a", 1, LEASE_MS, majority(3), 1);
    let first = grantor.renew(0, &renewal(&mut a, 0));
    assert_eq!(
        first.persist,
        Some(Promise {
            epoch: 1,
            region: "a".into()
        }),
        "made durable before the answer"
    );
    assert!(matches!(first.answer, RenewAnswer::Granted { .. }));
    assert_eq!(grantor.renew(1_000, &renewal(&mut a, 1_000)).persist, None, "said once");
    assert_eq!(grantor.remaining_ms(2_000), LEASE_MS - 1_000);

    // Another region asking for epoch 1 is refused; a vote for epoch 2 is granted, with
    // the time the grant to `a` has left.
    let mut c = Holder::new("c", 1, LEASE_MS, majority(3), 1);
    assert!(matches!(
        grantor.renew(2_000, &renewal(&mut c, 0)).answer,
        RenewAnswer::Refused { .. }
    ));
    let granted = grantor.vote(2_000, &vote(2, "b", VoteKind::Lost), lost());
    assert_eq!(granted.persist.as_ref().map(|p| p.epoch), Some(2));
    assert!(matches!(
        granted.answer,
        VoteAnswer::Granted {
            remaining_ms: 4_000,
            ..
        }
    ));
    // From then on `a`'s renewals are refused, naming the promise.
    let refused = grantor.renew(2_500, &renewal(&mut a, 2_500));
    assert_eq!(
        refused.answer,
        RenewAnswer::Refused {
            promise: Promise {
                epoch: 2,
                region: "b".into()
            }
        }
    );
    assert!(matches!(
        grantor.vote(2_600, &vote(2, "c", VoteKind::Forced), lost()).answer,
        VoteAnswer::Refused { .. }
    ));
    // The same vote again is granted again without a new promise (a retried promotion).
    let again = grantor.vote(
        2_700,
        &vote(2, "b", VoteKind::Lost),
        VoteFacts {
            primary_lost: false,
            better: None,
        },
    );
    assert_eq!(again.persist, None);
    assert!(matches!(again.answer, VoteAnswer::Granted { .. }));
}

#[test]
fn a_grantor_votes_for_an_automatic_failover_only_when_it_lost_the_primary_and_for_the_best() {
    let mut grantor = Grantor::new(
        0,
        Some(Promise {
            epoch: 1,
            region: "a".into(),
        }),
        LEASE_MS,
    );
    let heard = VoteFacts {
        primary_lost: false,
        better: None,
    };
    assert!(matches!(
        grantor.vote(10, &vote(2, "b", VoteKind::Lost), heard).answer,
        VoteAnswer::Refused { .. }
    ));
    let behind = VoteFacts {
        primary_lost: true,
        better: Some("c"),
    };
    let VoteAnswer::Refused { reason, .. } = grantor.vote(10, &vote(2, "b", VoteKind::Lost), behind).answer else {
        panic!("refused")
    };
    assert!(reason.contains("c is further ahead"), "{reason}");
    assert_eq!(
        grantor.promise().map(|p| p.epoch),
        Some(1),
        "a refusal promises nothing"
    );
    // An operator's forced failover needs neither.
    assert!(matches!(
        grantor.vote(10, &vote(2, "b", VoteKind::Forced), heard).answer,
        VoteAnswer::Granted { .. }
    ));
}

#[test]
fn a_restarted_grantor_assumes_its_last_grant_runs_a_whole_lease_from_its_start() {
    let grantor = Grantor::new(
        7_000,
        Some(Promise {
            epoch: 3,
            region: "a".into(),
        }),
        LEASE_MS,
    );
    assert_eq!(grantor.remaining_ms(7_000), LEASE_MS);
    assert_eq!(Grantor::new(7_000, None, LEASE_MS).remaining_ms(7_000), 0);
}

#[test]
fn a_planned_handover_waits_for_no_released_grant_but_for_any_later_one() {
    let mut a = Holder::new("a", 1, LEASE_MS, majority(3), 1);
    let mut grantor = Grantor::new(0, None, LEASE_MS);
    grantor.renew(0, &renewal(&mut a, 0));
    let released = a.release();
    assert!(!a.may_acknowledge(1), "released: nothing counts");
    let planned = VoteKind::Planned {
        holder: "a".into(),
        released_seq: released,
    };
    let answer = grantor.clone().vote(100, &vote(2, "b", planned.clone()), lost()).answer;
    assert!(matches!(answer, VoteAnswer::Granted { remaining_ms: 0, .. }));
    // The handover was called off and `a` renewed before the (late) vote arrived: that
    // grant counts in full.
    let later = renewal(&mut a, 200);
    grantor.renew(200, &later);
    a.granted("w", later.seq);
    assert!(matches!(
        grantor.vote(300, &vote(2, "b", planned), lost()).answer,
        VoteAnswer::Granted {
            remaining_ms: 4_900,
            ..
        }
    ));
    // A planned vote names the holder of the epoch before.
    let mut other = Grantor::new(
        0,
        Some(Promise {
            epoch: 1,
            region: "c".into(),
        }),
        LEASE_MS,
    );
    let wrong = VoteKind::Planned {
        holder: "a".into(),
        released_seq: released,
    };
    assert!(matches!(
        other.vote(0, &vote(2, "b", wrong), lost()).answer,
        VoteAnswer::Refused { .. }
    ));
}

#[test]
fn a_later_leaders_renewals_are_numbered_above_an_earlier_ones() {
    let mut first = Holder::new("a", 1, LEASE_MS, majority(3), 4);
    let mut second = Holder::new("a", 1, LEASE_MS, majority(3), 5);
    for _ in 0..1_000 {
        first.renewal(0, 0);
    }
    assert!(second.renewal(0, 0).seq > first.renewal(0, 0).seq);
}

#[test]
fn the_margin_covers_clocks_whose_rates_differ_by_up_to_4_9_percent() {
    // Rates in parts per thousand of real time, at either end of 2.4% either way.
    for (fast, slow) in [(1_024u64, 976u64), (976, 1_024), (1_000, 1_000)] {
        // A holder on the slow clock, its grantor on the fast one: the holder's lease ends
        // (in real time) before the grant does, though it asked when the grant began.
        let holder_end_real = holder_counts_ms(LEASE_MS) * 1_000 / slow;
        let grant_end_real = LEASE_MS * 1_000 / fast;
        assert!(holder_end_real <= grant_end_real, "{fast} {slow}");
        // A candidate on the fast clock waits out what a grantor on the slow one reported.
        let waited_real = wait_out_ms(LEASE_MS) * 1_000 / fast;
        let left_real = LEASE_MS * 1_000 / slow;
        assert!(waited_real >= left_real, "{fast} {slow}");
    }
}

#[test]
fn majorities_and_blocking_sets() {
    assert_eq!((majority(2), blocking(2)), (2, 1));
    assert_eq!((majority(3), blocking(3)), (2, 2));
    assert_eq!((majority(4), blocking(4)), (3, 2));
    assert_eq!((majority(5), blocking(5)), (3, 3));
    assert_eq!(forced_needs(2, majority(2)), 1, "two regions: the standby alone");
    assert_eq!(
        forced_needs(2, blocking(2)),
        2,
        "then no forced failover back without both"
    );
    assert_eq!(forced_needs(4, majority(4)), 2);
}

// The property: over random interleavings of renewals, votes, message delays and losses,
// restarts, leader changes, planned handovers called off, clocks running at different
// rates and random (even wrong) facts, no two regions may acknowledge at the same real
// time.

/// A region's clock: `offset + real * rate / 1000`; rates within the margin.
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset: u64,
    rate: u64,
}

impl Clock {
    fn at(&self, real: u64) -> u64 {
        self.offset + real * self.rate / 1000
    }
}

#[derive(Debug, Clone)]
enum Message {
    Renew {
        to: usize,
        renewal: Renewal,
    },
    RenewAnswer {
        to: usize,
        from: usize,
        answer: RenewAnswer,
    },
    Vote {
        to: usize,
        request: VoteRequest,
        primary_lost: bool,
    },
    VoteAnswer {
        to: usize,
        from: usize,
        epoch: u64,
        answer: VoteAnswer,
    },
}

#[derive(Debug, Clone)]
enum Move {
    /// Real time moves on by this many ms.
    Wait(u64),
    /// The holder in this region (if any) sends renewals to every region.
    Renew(usize),
    /// The message at this index (modulo the messages in flight) arrives.
    Deliver(usize),
    /// The message at this index is lost.
    Drop(usize),
    /// Region `.0` starts a campaign: kind `.1` (0 lost, 1 forced, 2 planned by the holder
    /// in region `.2`), every voter told `.3` about the primary (lost or not).
    Campaign(usize, u8, usize, bool),
    /// The region's grantor restarts, its promise kept.
    Restart(usize),
    /// The region's holder is replaced by a new leader's (a higher Raft term).
    NewLeader(usize),
}

fn moves(regions: usize) -> impl Strategy<Value = Vec<Move>> {
    let one = prop_oneof![
        2 => (1u64..2_000).prop_map(Move::Wait),
        2 => (1u64..60).prop_map(Move::Wait),
        3 => (0..regions).prop_map(Move::Renew),
        8 => any::<usize>().prop_map(Move::Deliver),
        1 => any::<usize>().prop_map(Move::Drop),
        2 => (0..regions, 0u8..3, 0..regions, any::<bool>()).prop_map(|(r, k, h, f)| Move::Campaign(r, k, h, f)),
        1 => (0..regions).prop_map(Move::Restart),
        1 => (0..regions).prop_map(Move::NewLeader),
    ];
    proptest::collection::vec(one, 1..400)
}

struct World {
    names: Vec<String>,
    clocks: Vec<Clock>,
    grantors: Vec<Grantor>,
    /// What each region made durable.
    promises: Vec<Option<Promise>>,
    holders: Vec<Option<Holder>>,
    /// Each campaign and the lease quorum its win gives (a blocking set when forced).
    campaigns: Vec<Option<(Campaign, usize)>>,
    terms: Vec<u64>,
    flight: Vec<Message>,
    real: u64,
    /// Epochs an operator forced a failover for: one operator, one forced failover per
    /// epoch (two operators forcing two regions, each sure the other is gone, can make two
    /// primaries when a blocking set is no majority, as with two regions: documented).
    forced: std::collections::BTreeSet<u64>,
}

impl World {
    fn new(clocks: Vec<Clock>) -> World {
        let n = clocks.len();
        let names: Vec<String> = (0..n).map(|r| format!("r{r}")).collect();
        let mut holders = vec![None; n];
        holders[0] = Some(Holder::new(&names[0], 1, LEASE_MS, majority(n), 1));
        World {
            names,
            clocks,
            grantors: (0..n).map(|_| Grantor::new(0, None, LEASE_MS)).collect(),
            promises: vec![None; n],
            holders,
            campaigns: vec![None; n],
            terms: vec![1; n],
            flight: Vec::new(),
            real: 0,
            forced: Default::default(),
        }
    }

    fn now(&self, region: usize) -> u64 {
        self.clocks[region].at(self.real)
    }

    fn keep(&mut self, region: usize, persist: Option<Promise>) {
        if let Some(promise) = persist {
            let kept = &mut self.promises[region];
            assert!(
                kept.as_ref().is_none_or(|p| p.epoch <= promise.epoch),
                "a promise never goes back"
            );
            *kept = Some(promise);
        }
    }

    fn play(&mut self, step: Move) {
        let n = self.names.len();
        match step {
            Move::Wait(ms) => self.real += ms,
            Move::Renew(r) => {
                let now = self.now(r);
                if let Some(holder) = self.holders[r].as_mut() {
                    let renewal = holder.renewal(now, 0);
                    for to in 0..n {
                        let renewal = renewal.clone();
                        self.flight.push(Message::Renew { to, renewal });
                    }
                }
            }
            Move::Deliver(i) if !self.flight.is_empty() => {
                let message = self.flight.remove(i % self.flight.len());
                self.deliver(message);
            }
            Move::Drop(i) if !self.flight.is_empty() => {
                self.flight.remove(i % self.flight.len());
            }
            Move::Deliver(_) | Move::Drop(_) => {}
            Move::Campaign(r, kind, h, primary_lost) => {
                let known = self.promises[r].as_ref().map_or(1, |p| p.epoch);
                let epoch = known.max(self.holders[r].as_ref().map_or(0, Holder::epoch)) + 1;
                let kind = match kind {
                    0 => VoteKind::Lost,
                    1 => VoteKind::Forced,
                    _ => {
                        let Some(holder) = self.holders[h].as_mut() else { return };
                        VoteKind::Planned {
                            holder: self.names[h].clone(),
                            released_seq: holder.release(),
                        }
                    }
                };
                if kind == VoteKind::Forced && !self.forced.insert(epoch) {
                    return;
                }
                // A forced failover needs enough promises to block the lease it replaces,
                // as far as the candidate knows how that epoch was won (its own, or the
                // first); an epoch it only promised may have been forced: the worst is
                // assumed. Its own lease then needs a blocking set.
                let replaced = match self.holders[r].as_ref() {
                    Some(holder) if holder.epoch() == epoch - 1 => holder.quorum(),
                    _ if epoch - 1 == 1 => majority(n),
                    _ => blocking(n),
                };
                let (needed, quorum) = if kind == VoteKind::Forced {
                    (forced_needs(n, replaced), blocking(n))
                } else {
                    (majority(n), majority(n))
                };
                self.campaigns[r] = Some((Campaign::new(epoch, needed, self.now(r), 20_000), quorum));
                let request = VoteRequest {
                    epoch,
                    candidate: self.names[r].clone(),
                    revision: 0,
                    kind,
                };
                for to in 0..n {
                    let request = request.clone();
                    self.flight.push(Message::Vote {
                        to,
                        request,
                        primary_lost,
                    });
                }
            }
            Move::Restart(r) => {
                self.grantors[r] = Grantor::new(self.now(r), self.promises[r].clone(), LEASE_MS);
            }
            Move::NewLeader(r) => {
                self.terms[r] += 1;
                let term = self.terms[r];
                if let Some(holder) = self.holders[r].as_mut() {
                    *holder = Holder::new(&self.names[r], holder.epoch(), LEASE_MS, holder.quorum(), term);
                }
            }
        }
        // Campaigns that may promote do so now.
        for r in 0..n {
            let now = self.now(r);
            let Some((campaign, quorum)) = &self.campaigns[r] else {
                continue;
            };
            match campaign.step(now, 0) {
                Step::Promote { .. } => {
                    let epoch = campaign.epoch;
                    self.holders[r] = Some(Holder::new(&self.names[r], epoch, LEASE_MS, *quorum, self.terms[r]));
                    self.campaigns[r] = None;
                }
                Step::Superseded { .. } | Step::GaveUp { .. } => self.campaigns[r] = None,
                Step::Gathering { .. } | Step::WaitingOutLease { .. } => {}
            }
        }
    }

    fn deliver(&mut self, message: Message) {
        match message {
            Message::Renew { to, renewal } => {
                let now = self.now(to);
                let decided = self.grantors[to].renew(now, &renewal);
                self.keep(to, decided.persist);
                let from = self.names.iter().position(|n| *n == renewal.holder).expect("a region");
                self.flight.push(Message::RenewAnswer {
                    to: from,
                    from: to,
                    answer: decided.answer,
                });
            }
            Message::RenewAnswer { to, from, answer } => {
                let Some(holder) = self.holders[to].as_mut() else {
                    return;
                };
                match answer {
                    RenewAnswer::Granted { seq } => holder.granted(&self.names[from], seq),
                    RenewAnswer::Refused { promise } if promise.epoch > holder.epoch() => self.holders[to] = None,
                    RenewAnswer::Refused { .. } => {}
                }
            }
            Message::Vote {
                to,
                request,
                primary_lost,
            } => {
                let facts = VoteFacts {
                    primary_lost,
                    better: None,
                };
                let now = self.now(to);
                let decided = self.grantors[to].vote(now, &request, facts);
                self.keep(to, decided.persist);
                let from = self
                    .names
                    .iter()
                    .position(|n| *n == request.candidate)
                    .expect("a region");
                self.flight.push(Message::VoteAnswer {
                    to: from,
                    from: to,
                    epoch: request.epoch,
                    answer: decided.answer,
                });
            }
            Message::VoteAnswer {
                to,
                from,
                epoch,
                answer,
            } => {
                let now = self.now(to);
                let name = self.names[from].clone();
                if let Some((campaign, _)) = self.campaigns[to].as_mut().filter(|(c, _)| c.epoch == epoch) {
                    campaign.answered(now, &name, &answer);
                }
            }
        }
    }
}

fn check_one_writer(world: &World) -> Result<(), TestCaseError> {
    let writers: Vec<usize> = (0..world.names.len())
        .filter(|r| {
            world.holders[*r]
                .as_ref()
                .is_some_and(|h| h.may_acknowledge(world.now(*r)))
        })
        .collect();
    prop_assert!(
        writers.len() <= 1,
        "at real time {} regions {:?} may all acknowledge (epochs {:?})",
        world.real,
        writers,
        writers
            .iter()
            .map(|r| world.holders[*r].as_ref().map(Holder::epoch))
            .collect::<Vec<_>>()
    );
    Ok(())
}

fn clocks() -> impl Strategy<Value = Vec<Clock>> {
    // Rates within 2.4% of real time either way: any two within the margin.
    let clock = (0u64..100_000, 976u64..=1_024).prop_map(|(offset, rate)| Clock { offset, rate });
    proptest::collection::vec(clock, 2..=5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn no_two_regions_may_acknowledge_at_the_same_real_time(
        clocks in clocks(),
        moves in moves(5),
    ) {
        let n = clocks.len();
        let mut world = World::new(clocks);
        for step in moves {
            let step = match step {
                Move::Renew(r) => Move::Renew(r % n),
                Move::Campaign(r, k, h, f) => Move::Campaign(r % n, k, h % n, f),
                Move::Restart(r) => Move::Restart(r % n),
                Move::NewLeader(r) => Move::NewLeader(r % n),
                other => other,
            };
            world.play(step);
            check_one_writer(&world)?;
        }
    }
}

/// The simulation is not vacuous: with a fixed schedule a standby takes over and
/// acknowledges after the first primary stopped.
#[test]
fn the_simulation_reaches_failovers() {
    let clocks = vec![
        Clock { offset: 0, rate: 1_000 },
        Clock { offset: 500, rate: 990 },
        Clock { offset: 9, rate: 1_010 },
    ];
    let mut world = World::new(clocks);
    let deliver_all = |world: &mut World| {
        while !world.flight.is_empty() {
            world.play(Move::Deliver(0));
        }
    };
    world.play(Move::Renew(0));
    deliver_all(&mut world);
    assert!(world.holders[0]
        .as_ref()
        .is_some_and(|h| h.may_acknowledge(world.now(0))));
    world.play(Move::Wait(1_000));
    world.play(Move::Campaign(1, 0, 0, true));
    deliver_all(&mut world);
    assert!(world.holders[1].is_none(), "waits out the old lease");
    world.play(Move::Wait(6_000));
    assert!(world.holders[1].is_some(), "promoted once it ran out");
    world.play(Move::Renew(1));
    deliver_all(&mut world);
    assert!(world.holders[1]
        .as_ref()
        .is_some_and(|h| h.may_acknowledge(world.now(1))));
    world.play(Move::Renew(0));
    deliver_all(&mut world);
    assert!(
        world.holders[0].is_none(),
        "the old holder learns of the newer epoch and stops"
    );
}
