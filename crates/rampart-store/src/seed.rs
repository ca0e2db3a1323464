//! A standby region's install of the primary region's shipped state, for when the primary
//! no longer keeps the writes the standby lacks (its history of shipped writes has moved
//! past them). The state comes through the standby's own log in steps (`Op::Seed`):
//! everything but the keys, then the keys in order, a chunk at a time, then the end. It is
//! put together beside the standby's shipped part ([`Seeding`], kept in snapshots after
//! the state), and put in its place at once at the end: until then reads see the standby's
//! old state, whole. A new `Begin` drops an install left unfinished (the standby's leader
//! changed mid-way); any step out of turn is refused and changes nothing.

use serde::{Deserialize, Serialize};

use crate::command::{Op, Outcome};
use crate::shipped::{Record, Shipped};

/// One step of an install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeedStep {
    /// A new install of the primary's shipped state at `revision`: everything but the keys
    /// (`rest.kv` is empty).
    Begin { revision: u64, rest: Box<Shipped> },
    /// The next keys, in key order, after those of the steps before.
    Keys {
        revision: u64,
        entries: Vec<(String, Record)>,
    },
    /// Every key sent, and the checksum the whole has on the primary: the install takes
    /// the shipped part's place (the standby's leader compares the checksums then).
    End { revision: u64, checksum: String },
}

impl SeedStep {
    /// The command that takes this step.
    pub fn to_op(&self) -> Op {
        Op::Seed {
            step: postcard::to_allocvec(self).expect("a step encodes"),
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            SeedStep::Begin { revision, .. } | SeedStep::Keys { revision, .. } | SeedStep::End { revision, .. } => {
                *revision
            }
        }
    }
}

/// An install under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seeding {
    pub revision: u64,
    /// What has arrived so far.
    pub shipped: Shipped,
    /// The last key that arrived: the next must come after it.
    pub last_key: Option<String>,
}

/// Takes `step` of an install into `shipped` (the standby's shipped part), with the install
/// under way in `seeding`. `End` replaces `shipped` and answers [`Outcome::Seeded`].
pub fn step(seeding: &mut Option<Box<Seeding>>, shipped: &mut Shipped, step: &SeedStep) -> Outcome {
    let refused = |reason: String| Outcome::SeedRefused { reason };
    let revision = step.revision();
    if let SeedStep::Begin { rest, .. } = step {
        // Ahead of the install only after a region failover this region did not take part
        // in: the writes past it were set aside (a divergence file), the new primary's state
        // replaces them.
        if revision <= shipped.revision && rest.epoch() <= shipped.epoch() {
            return refused(format!(
                "this region is at revision {} already, not behind {revision}",
                shipped.revision
            ));
        }
        if !rest.kv.is_empty() || rest.revision != revision {
            return refused("the first step carries everything but the keys, at its revision".to_string());
        }
        *seeding = Some(Box::new(Seeding {
            revision,
            shipped: (**rest).clone(),
            last_key: None,
        }));
        return Outcome::Seeding { revision };
    }
    let Some(under_way) = seeding.as_mut().filter(|s| s.revision == revision) else {
        return refused(format!("no install of revision {revision} is under way"));
    };
    match step {
        SeedStep::Keys { entries, .. } => {
            let mut last = under_way.last_key.as_deref();
            if let Some(bad) = entries.iter().map(|(k, _)| k.as_str()).find(|k| {
                let out_of_order = last.is_some_and(|l| *k <= l);
                last = Some(k);
                out_of_order
            }) {
                return refused(format!("key {bad:?} is out of order"));
            }
            for (key, record) in entries {
                under_way.shipped.kv.insert(key.clone(), record.clone());
            }
            if let Some((key, _)) = entries.last() {
                under_way.last_key = Some(key.clone());
            }
            Outcome::Seeding { revision }
        }
        SeedStep::End { checksum, .. } => {
            let done = seeding.take().expect("checked above");
            *shipped = done.shipped;
            Outcome::Seeded {
                revision,
                checksum: checksum.clone(),
            }
        }
        SeedStep::Begin { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(value: &str, revision: u64) -> Record {
        Record {
            value: Arc::from(value),
            revision,
            create_revision: revision,
            lease: None,
        }
    }

    fn primary(keys: u64) -> Shipped {
        let mut shipped = Shipped::default();
        for i in 0..keys {
            shipped.kv.insert(format!("k{i:03}"), record("v", i + 1));
        }
        shipped.revision = keys;
        shipped
    }

    /// The first step of an install of `source`.
    pub(crate) fn begin(source: &Shipped) -> SeedStep {
        let mut rest = source.clone();
        rest.kv.clear();
        SeedStep::Begin {
            revision: source.revision,
            rest: Box::new(rest),
        }
    }

    /// The keys of `source` in `range` (by position, in key order), as one step.
    pub(crate) fn keys(source: &Shipped, range: std::ops::Range<usize>) -> SeedStep {
        SeedStep::Keys {
            revision: source.revision,
            entries: source
                .kv
                .iter()
                .skip(range.start)
                .take(range.len())
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        }
    }

    fn end(revision: u64) -> SeedStep {
        SeedStep::End {
            revision,
            checksum: "c".into(),
        }
    }

    #[test]
    fn an_install_in_steps_makes_the_primarys_state_and_leaves_the_old_one_until_the_end() {
        let source = primary(10);
        let mut standby = primary(3);
        let old = standby.clone();
        let mut seeding = None;
        for s in [begin(&source), keys(&source, 0..4), keys(&source, 4..10)] {
            assert_eq!(step(&mut seeding, &mut standby, &s), Outcome::Seeding { revision: 10 });
            assert_eq!(standby, old, "reads see the old state, whole, until the end");
        }
        let outcome = step(&mut seeding, &mut standby, &end(10));
        assert!(matches!(outcome, Outcome::Seeded { revision: 10, .. }), "{outcome:?}");
        assert_eq!(standby, source);
        assert!(seeding.is_none());
    }

    #[test]
    fn steps_out_of_turn_are_refused_and_change_nothing() {
        let source = primary(10);
        let mut standby = primary(3);
        let mut seeding = None;
        let refused = |o: Outcome| matches!(o, Outcome::SeedRefused { .. });
        // Keys or an end with no install under way.
        assert!(refused(step(&mut seeding, &mut standby, &keys(&source, 0..2))));
        assert!(refused(step(&mut seeding, &mut standby, &end(10))));
        // An install of a revision this region has already.
        assert!(refused(step(&mut seeding, &mut standby, &begin(&primary(2)))));
        assert!(seeding.is_none());
        // Keys out of order, or of another install.
        step(&mut seeding, &mut standby, &begin(&source));
        step(&mut seeding, &mut standby, &keys(&source, 4..6));
        let before = seeding.clone();
        assert!(refused(step(&mut seeding, &mut standby, &keys(&source, 0..2))));
        assert!(refused(step(&mut seeding, &mut standby, &keys(&primary(12), 8..10))));
        assert_eq!(seeding, before);
        // A new begin starts over (the standby's leader changed mid-way).
        step(&mut seeding, &mut standby, &begin(&source));
        assert_eq!(seeding.as_ref().map(|s| s.shipped.kv.len()), Some(0));
        step(&mut seeding, &mut standby, &keys(&source, 0..10));
        step(&mut seeding, &mut standby, &end(10));
        assert_eq!(standby, source);
    }

    #[test]
    fn a_region_ahead_installs_a_newer_epochs_state_over_its_own() {
        // An old primary at revision 8 of epoch 1; the new primary failed over at revision 6.
        let mut old = primary(8);
        let mut source = primary(5);
        source.apply(&crate::command::Command {
            at_ms: 1,
            op: crate::command::Op::RegionEpoch {
                epoch: 2,
                region: "west".into(),
                forced: false,
            },
        });
        assert_eq!((source.revision, source.epoch()), (6, 2));
        let mut seeding = None;
        assert_eq!(
            step(&mut seeding, &mut old, &begin(&source)),
            Outcome::Seeding { revision: 6 }
        );
        step(&mut seeding, &mut old, &keys(&source, 0..5));
        assert!(matches!(
            step(&mut seeding, &mut old, &end(6)),
            Outcome::Seeded { revision: 6, .. }
        ));
        assert_eq!(old, source);
        // At the same epoch, ahead is ahead: refused.
        let mut ahead = primary(8);
        assert!(matches!(
            step(&mut None, &mut ahead, &begin(&primary(5))),
            Outcome::SeedRefused { .. }
        ));
    }
}
