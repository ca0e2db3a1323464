//! When a node of the primary region lets go of the service primaries it hosts (safety
//! rules 4 and 5 together): before its region's lease can end, since another region
//! promotes its own instances only after that lease ran out where it was granted.
//!
//! Only the region's leader holds the lease ([`super::lease::Holder`]). Every other node of
//! the primary region asks the leader each `health_check_interval` how long the lease has
//! left, and keeps the latest end it was told, on its own monotonic clock:
//! - the answer's time left counts from when the node *asked* (the leader answered later,
//!   so the lease ends no earlier than that), shortened by the clock-rate margin;
//! - the node fences once its clock is a quarter of the lease before that end, with no
//!   later answer pushing it back: the same share of margin as the service hold's
//!   (`failover::Hold`), for scheduling and the hook's own start;
//! - a node counts its start (and the start of a new epoch for its region) as an answer
//!   with a whole lease left, as a node counts its start as contact with the majority: a
//!   restart alone never fences, and a region that just took over has a lease's time to
//!   renew it.

use super::lease::holder_counts_ms;

/// A node's view of its region's lease end, for fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseEnd {
    lease_ms: u64,
    epoch: u64,
    end_ms: u64,
}

impl LeaseEnd {
    /// A node that starts at `now_ms`, or whose region became the primary at `epoch` then.
    pub fn new(now_ms: u64, epoch: u64, lease_ms: u64) -> LeaseEnd {
        LeaseEnd {
            lease_ms,
            epoch,
            end_ms: now_ms + holder_counts_ms(lease_ms),
        }
    }

    /// The epoch this view is of: a view of another epoch says nothing about this one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The leader answered a question asked at `asked_ms`: its lease of `epoch` has
    /// `remaining_ms` left (0: it holds none). An answer of another epoch is ignored, and
    /// no answer moves the end earlier: a lease once granted runs its course.
    pub fn told(&mut self, epoch: u64, asked_ms: u64, remaining_ms: u64) {
        if epoch != self.epoch || remaining_ms == 0 {
            return;
        }
        self.end_ms = self.end_ms.max(asked_ms + holder_counts_ms(remaining_ms));
    }

    /// Whether the node must have let go of its primaries by `now_ms`.
    pub fn must_fence(&self, now_ms: u64) -> bool {
        now_ms + self.lease_ms / 4 >= self.end_ms
    }

    /// How long until the node must fence (0: now).
    pub fn fence_in_ms(&self, now_ms: u64) -> u64 {
        self.end_ms.saturating_sub(self.lease_ms / 4).saturating_sub(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::lease::Holder;

    const LEASE: u64 = 1000;

    #[test]
    fn a_start_counts_as_a_whole_lease_and_fences_a_quarter_before_it_ends() {
        let view = LeaseEnd::new(10_000, 1, LEASE);
        // 950 ms counted (the clock margin), fenced 250 ms before that.
        assert!(!view.must_fence(10_699));
        assert!(view.must_fence(10_700));
        assert_eq!(view.fence_in_ms(10_000), 700);
    }

    #[test]
    fn an_answer_counts_from_when_it_was_asked_and_only_ever_pushes_the_end_later() {
        let mut view = LeaseEnd::new(0, 1, LEASE);
        view.told(1, 600, 1000);
        // 600 + 950: asked at 600, however late the answer came.
        assert!(!view.must_fence(1299));
        assert!(view.must_fence(1300));
        // An older question answered late, or a new leader with no lease yet, changes
        // nothing.
        view.told(1, 100, 500);
        view.told(1, 1200, 0);
        assert!(view.must_fence(1300));
    }

    #[test]
    fn an_answer_of_another_epoch_says_nothing() {
        let mut view = LeaseEnd::new(0, 1, LEASE);
        view.told(2, 600, 1000);
        assert!(view.must_fence(700));
        assert_eq!(view.epoch(), 1);
    }

    /// The rule the fence rests on: a node told by its leader fences no later than the
    /// leader's own lease ends, whatever the delays, with the node's clock running up to the
    /// margin's half faster or slower than the leader's.
    #[test]
    fn a_node_fences_before_its_leaders_lease_ends() {
        const RENEWED: u64 = 5_000;
        for delay in [0u64, 1, 50, 200, 400, 900] {
            for answered_after in [0u64, 10, 300] {
                let mut holder = Holder::new("east", 1, LEASE, 1, 1);
                let renewal = holder.renewal(RENEWED, 0);
                holder.granted("east", renewal.seq);
                let until = holder.valid_until_ms().expect("granted");
                // On the leader's clock: asked `delay` after the renewal, answered later.
                let asked = RENEWED + delay;
                let answered = asked + answered_after;
                let remaining = until.saturating_sub(answered);
                for rate_percent in [98u64, 100, 102] {
                    let local = |leader_ms: u64| leader_ms * rate_percent / 100;
                    let mut view = LeaseEnd::new(0, 1, LEASE);
                    view.told(1, local(asked), remaining);
                    let fenced_local = (local(answered)..).find(|t| view.must_fence(*t)).expect("fences");
                    let fenced = fenced_local * 100 / rate_percent;
                    assert!(
                        fenced < until || remaining == 0,
                        "delay {delay}, answered after {answered_after}, rate {rate_percent}: fenced at {fenced}, lease until {until}"
                    );
                }
            }
        }
    }
}
