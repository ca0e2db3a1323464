//! Regions as configured: which region is primary when a deployment starts, the other
//! regions a node knows (their endpoints, whether one is a witness) and the timings of
//! region health and verification. Validated by field path (`regions.known.NAME.endpoints[1]`)
//! so a bad topology exits 2 before a node starts.
//!
//! `primary` only seeds a new deployment; afterwards the replicated region epoch decides.

pub mod fence;
pub mod lease;
pub mod takeover;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::field::{duration_ms, field_error, FieldError};

/// `[regions]` as written in a node's config file, or gathered from `--primary-region` and
/// `--known-region` (which replace the file's values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionsSpec {
    /// The primary region of a new deployment.
    pub primary: Option<String>,
    /// How often a node checks each other region (default 1s).
    pub health_check_interval: Option<String>,
    /// A region not heard from for this long is unreachable (default 5s).
    pub region_timeout: Option<String>,
    /// A standby further behind than this raises an alert (default 5s).
    pub max_lag: Option<String>,
    /// How often each standby compares its checksum with the primary's (default 30s).
    pub verify_interval: Option<String>,
    /// How long a grant of the region lease lasts (default 5s): the primary renews it every
    /// `health_check_interval` and turns read-only on its own when it cannot.
    pub region_lease: Option<String>,
    /// Whether the regions fail over by themselves when the primary region is lost
    /// (default: when there are three regions or more, a witness included; two regions
    /// alone never do).
    pub auto_failover: Option<bool>,
    /// Bounded RPO: the primary stops acknowledging writes while every standby is further
    /// behind than this, a duration (`"500ms"`) or a number of revisions (`1000`).
    pub max_rpo_lag: Option<RpoBoundSpec>,
    /// The other regions, by name: never this node's own.
    #[serde(default)]
    pub known: BTreeMap<String, KnownRegionSpec>,
}

/// `max_rpo_lag` as written: a duration or a revision count.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RpoBoundSpec {
    Revisions(u64),
    Duration(String),
}

/// The bound a primary keeps its standbys within before it acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpoBound {
    /// The oldest write the best standby has not applied is at most this old (the
    /// primary's clock).
    Ms(u64),
    /// The best standby lacks at most this many revisions.
    Revisions(u64),
}

impl RpoBound {
    /// Whether a standby that lacks `revisions` revisions, the oldest committed `age_ms`
    /// ago, is within the bound.
    pub fn holds(&self, revisions: u64, age_ms: u64) -> bool {
        match *self {
            RpoBound::Ms(ms) => revisions == 0 || age_ms <= ms,
            RpoBound::Revisions(n) => revisions <= n,
        }
    }
}

impl std::fmt::Display for RpoBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpoBound::Ms(ms) => write!(f, "{ms}ms"),
            RpoBound::Revisions(n) => write!(f, "{n} revisions"),
        }
    }
}

/// `[regions.known.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownRegionSpec {
    /// Its nodes, `HOST:PORT`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// A witness: a one-node region that keeps no data and only votes on region failover.
    #[serde(default)]
    pub witness: bool,
}

/// The validated topology, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    /// The primary region of a new deployment (this node's own, or one of `known`).
    pub primary: String,
    pub health_check_interval_ms: u64,
    pub region_timeout_ms: u64,
    pub max_lag_ms: u64,
    pub verify_interval_ms: u64,
    pub region_lease_ms: u64,
    pub auto_failover: bool,
    pub max_rpo_lag: Option<RpoBound>,
    /// The other regions, by name.
    pub known: BTreeMap<String, KnownRegion>,
}

/// Another region this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRegion {
    pub endpoints: Vec<SocketAddr>,
    pub witness: bool,
}

/// Region names: the characters a `--region` may use.
pub fn check_region_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        return Ok(());
    }
    Err(field_error(field, name, "letters, digits, '-' and '_' only, not empty"))
}

impl RegionsSpec {
    /// Reads `--known-region NAME=EP,EP` values (also `RAMPART_KNOWN_REGIONS`, split at
    /// `;`) into `known`, replacing the file's list.
    pub fn set_known_from_flags(&mut self, values: &[String]) -> Result<(), FieldError> {
        let mut known = BTreeMap::new();
        for value in values {
            let Some((name, endpoints)) = value.split_once('=') else {
                return Err(field_error(
                    "known-region",
                    value,
                    "NAME=HOST:PORT[,HOST:PORT...], e.g. us-east-1=10.0.0.1:7001,10.0.0.2:7001",
                ));
            };
            let spec = KnownRegionSpec {
                endpoints: endpoints.split(',').map(|e| e.trim().to_string()).collect(),
                witness: false,
            };
            if known.insert(name.trim().to_string(), spec).is_some() {
                return Err(field_error("known-region", value, "each region once"));
            }
        }
        self.known = known;
        Ok(())
    }

    /// Checks the topology of a node of region `own`, which serves at `own_addrs`: every
    /// name valid, no region listing itself, a primary that is this region or a known one
    /// (never a witness), every endpoint an address and none given twice (nor this
    /// node's own), timings in range.
    pub fn validate(&self, own: &str, own_addrs: &[SocketAddr]) -> Result<Regions, FieldError> {
        let mut known = BTreeMap::new();
        let mut seen: BTreeMap<SocketAddr, String> = own_addrs
            .iter()
            .map(|addr| (*addr, format!("this node's own address ({own})")))
            .collect();
        for (name, spec) in &self.known {
            let field = format!("regions.known.{name}");
            check_region_name(&field, name)?;
            if name == own {
                return Err(field_error(
                    &field,
                    name,
                    "a node lists the other regions, not its own (this is its --region)",
                ));
            }
            if spec.endpoints.is_empty() {
                return Err(field_error(format!("{field}.endpoints"), "", "at least one HOST:PORT"));
            }
            if spec.witness && spec.endpoints.len() != 1 {
                return Err(field_error(
                    format!("{field}.endpoints"),
                    spec.endpoints.join(","),
                    "a witness is one node: exactly one HOST:PORT",
                ));
            }
            let mut endpoints = Vec::new();
            for (i, text) in spec.endpoints.iter().enumerate() {
                let field = format!("{field}.endpoints[{i}]");
                let addr: SocketAddr = text
                    .parse()
                    .map_err(|_| field_error(&field, text, "HOST:PORT with an IP address, e.g. 10.0.0.1:7001"))?;
                if let Some(first) = seen.insert(addr, field.clone()) {
                    return Err(field_error(&field, text, format!("already given as {first}")));
                }
                endpoints.push(addr);
            }
            let region = KnownRegion {
                endpoints,
                witness: spec.witness,
            };
            known.insert(name.clone(), region);
        }
        let primary = match &self.primary {
            Some(primary) => primary.clone(),
            None if known.is_empty() => own.to_string(),
            None => {
                return Err(field_error(
                    "regions.primary",
                    "",
                    "required when other regions are known (--primary-region NAME)",
                ))
            }
        };
        if primary != own && !known.contains_key(&primary) {
            let names: Vec<&str> = std::iter::once(own).chain(known.keys().map(String::as_str)).collect();
            return Err(field_error(
                "regions.primary",
                &primary,
                format!("one of the regions this node knows: {}", names.join(", ")),
            ));
        }
        if known.get(&primary).is_some_and(|r| r.witness) {
            return Err(field_error(
                "regions.primary",
                &primary,
                "a witness keeps no data and cannot be primary",
            ));
        }
        let ms = |field: &str, text: &Option<String>, default_ms| {
            duration_ms(&format!("regions.{field}"), text.as_deref(), default_ms, 50, 3_600_000)
        };
        let health_check_interval_ms = ms("health_check_interval", &self.health_check_interval, 1_000)?;
        let region_timeout_ms = ms("region_timeout", &self.region_timeout, 5_000)?;
        if region_timeout_ms < 2 * health_check_interval_ms {
            return Err(field_error(
                "regions.region_timeout",
                self.region_timeout.clone().unwrap_or_else(|| "5s".into()),
                format!(
                    "at least twice regions.health_check_interval ({}ms), or one late answer makes a region unreachable",
                    2 * health_check_interval_ms
                ),
            ));
        }
        let region_lease_ms = ms("region_lease", &self.region_lease, 5_000)?;
        if region_lease_ms < 2 * health_check_interval_ms {
            return Err(field_error(
                "regions.region_lease",
                self.region_lease.clone().unwrap_or_else(|| "5s".into()),
                format!(
                    "at least twice regions.health_check_interval ({}ms): the lease is renewed every interval, and one late renewal must not make the primary read-only",
                    2 * health_check_interval_ms
                ),
            ));
        }
        // Three regions or more (a witness counts) can tell a lost primary by a majority.
        let regions = 1 + known.len();
        let auto_failover = match self.auto_failover {
            Some(true) if regions < 3 => {
                return Err(field_error(
                    "regions.auto_failover",
                    "true",
                    "false with two regions: a standby alone cannot tell a lost primary from a lost link; add a witness region (witness = true) or a third region",
                ))
            }
            Some(chosen) => chosen,
            None => regions >= 3,
        };
        Ok(Regions {
            primary,
            health_check_interval_ms,
            region_timeout_ms,
            max_lag_ms: ms("max_lag", &self.max_lag, 5_000)?,
            verify_interval_ms: ms("verify_interval", &self.verify_interval, 30_000)?,
            region_lease_ms,
            auto_failover,
            max_rpo_lag: match &self.max_rpo_lag {
                None => None,
                Some(RpoBoundSpec::Revisions(0)) => {
                    return Err(field_error(
                        "regions.max_rpo_lag",
                        "0",
                        "a duration (500ms) or a number of revisions above 0: 0 would stop every write until a standby had it",
                    ))
                }
                Some(RpoBoundSpec::Revisions(n)) => Some(RpoBound::Revisions(*n)),
                Some(RpoBoundSpec::Duration(text)) => Some(RpoBound::Ms(duration_ms(
                    "regions.max_rpo_lag",
                    Some(text),
                    0,
                    10,
                    3_600_000,
                )?)),
            },
            known,
        })
    }
}

/// What changed about another region's reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// No answer for the region timeout.
    Lost,
    /// It answers again after it was reported lost.
    Regained,
}

/// One node's contact with another region, with explicit time: when it last answered,
/// and whether its loss was reported (so each loss and each return is said once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact<T> {
    /// Counted from here until the first answer: a node that just started has not lost
    /// a region it never asked.
    since: T,
    last_answer: Option<T>,
    lost: bool,
}

impl<T: Copy + Ord + std::ops::Sub<Output = std::time::Duration>> Contact<T> {
    pub fn new(now: T) -> Contact<T> {
        Contact {
            since: now,
            last_answer: None,
            lost: false,
        }
    }

    /// The region answered at `now`.
    pub fn answered(&mut self, now: T) -> Option<Reach> {
        self.last_answer = Some(now);
        std::mem::replace(&mut self.lost, false).then_some(Reach::Regained)
    }

    /// A check at `now` found no answer; lost once nothing was heard for `timeout`.
    pub fn missed(&mut self, now: T, timeout: std::time::Duration) -> Option<Reach> {
        if self.lost || self.reachable(now, timeout) {
            return None;
        }
        self.lost = true;
        Some(Reach::Lost)
    }

    /// Heard from within `timeout` (or not asked for that long yet).
    pub fn reachable(&self, now: T, timeout: std::time::Duration) -> bool {
        now - self.last_answer.unwrap_or(self.since).max(self.since) < timeout
    }

    /// When it last answered.
    pub fn last_answer(&self) -> Option<T> {
        self.last_answer
    }
}

/// Whether a standby's lag crossed `max_lag_ms` since it was last judged (`was_over`):
/// `Some(true)` when it went over, `Some(false)` when it came back under, else `None`. An
/// unknown lag changes nothing.
pub fn lag_crossed(was_over: bool, lag_ms: Option<u64>, max_lag_ms: u64) -> Option<bool> {
    let over = lag_ms? > max_lag_ms;
    (over != was_over).then_some(over)
}

/// The region epoch of a deployment before any region failover. Every message between
/// regions carries the epoch its sender knows; a region failover moves it.
pub const FIRST_EPOCH: u64 = 1;

/// A region failover as the shipped history records it: from the write at `revision` (the
/// one that recorded it) on, `region` is the primary at `epoch`. Before the first, the
/// configured primary is, at [`FIRST_EPOCH`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub region: String,
    pub revision: u64,
    /// The promoting leader's wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// Taken by an operator's forced failover (`--allow-data-loss`) with the promises of a
    /// blocking set only: the region holds its lease from as many (see `lease_quorum`).
    #[serde(default)]
    pub forced: bool,
}

impl EpochStart {
    /// How many regions must grant the lease of this epoch, in a deployment of `regions`:
    /// a majority; after a forced failover, a blocking set (with two regions, the new
    /// primary alone: the old one cannot renew without it). Safe against the old primary
    /// and against any later failover, which needs a majority, and every majority shares a
    /// region with every blocking set.
    pub fn lease_quorum(&self, regions: usize) -> usize {
        if self.forced {
            lease::blocking(regions)
        } else {
            lease::majority(regions)
        }
    }
}

/// Where a region that knows epoch `epoch` and holds shipped revisions up to `revision`
/// parted from the history `epochs` (another region's), if it did: the revision of the
/// first failover after its epoch there. A region that wrote at or past it holds writes
/// the other never had (an old primary's unshipped suffix, or a standby that took them
/// from it): they must be set aside and the region resynced from before them.
pub fn divergence(epochs: &[EpochStart], epoch: u64, revision: u64) -> Option<u64> {
    let next = epochs.iter().find(|e| e.epoch > epoch)?;
    (revision >= next.revision).then_some(next.revision)
}

impl Regions {
    /// Every region of the deployment, this one included: the lease and failovers count
    /// majorities of these.
    pub fn count(&self) -> usize {
        1 + self.known.len()
    }

    /// Whether an instance registered in `region` is a *standby instance* as seen by a
    /// node of region `own` while `primary` is the primary region: it is in a region of
    /// this deployment (this one or a known one) that is not the primary. Standby
    /// instances are never promoted by a service failover, only by a region failover. A
    /// region name no region goes by is a label, not a region.
    pub fn in_standby_region(&self, primary: &str, own: &str, region: &str) -> bool {
        region != primary && (region == own || self.known.contains_key(region))
    }

    /// Whether this region's nodes look after an instance registered in `region` (probe
    /// it, commit its verdicts, run its hooks, supervise it): one of this region, or of a
    /// name no other region goes by. Another region's instances are its own nodes' to
    /// watch: verdicts are region-local.
    pub fn looks_after(&self, region: &str) -> bool {
        !self.known.contains_key(region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    fn spec(primary: &str, known: &[&str]) -> RegionsSpec {
        let mut spec = RegionsSpec {
            primary: Some(primary.to_string()),
            ..RegionsSpec::default()
        };
        let values: Vec<String> = known.iter().map(|k| k.to_string()).collect();
        spec.set_known_from_flags(&values).expect("flags");
        spec
    }

    const OWN: &[&str] = &["127.0.0.1:7101"];

    fn validate(spec: &RegionsSpec) -> Result<Regions, FieldError> {
        let own: Vec<SocketAddr> = OWN.iter().map(|a| addr(a)).collect();
        spec.validate("us-west-2", &own)
    }

    #[test]
    fn instances_of_another_known_region_are_its_own_and_standbys_unless_primary() {
        let primary = spec("us-east-1", &["us-east-1=127.0.0.1:7001"]);
        let regions = validate(&primary).expect("valid");
        // Seen from us-west-2, a standby region.
        assert!(regions.in_standby_region("us-east-1", "us-west-2", "us-west-2"));
        assert!(!regions.in_standby_region("us-east-1", "us-west-2", "us-east-1"));
        assert!(
            !regions.in_standby_region("us-east-1", "us-west-2", "rack-7"),
            "a label, not a region"
        );
        assert!(regions.looks_after("us-west-2") && regions.looks_after("rack-7"));
        // After a region failover to us-west-2 the roles turn round.
        assert!(!regions.in_standby_region("us-west-2", "us-west-2", "us-west-2"));
        assert!(regions.in_standby_region("us-west-2", "us-west-2", "us-east-1"));
        assert!(!regions.looks_after("us-east-1"), "the primary region watches its own");
        // A region alone: every name is its own or a label; nothing is a standby.
        let alone = RegionsSpec::default().validate("local", &[]).expect("valid");
        assert!(
            !alone.in_standby_region("local", "local", "local")
                && !alone.in_standby_region("local", "local", "us-east-1")
        );
        assert!(alone.looks_after("us-east-1"));
    }

    #[test]
    fn a_standby_region_knows_the_primary_and_a_witness() {
        let mut spec = spec(
            "us-east-1",
            &[
                "us-east-1=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
                "dr-witness=127.0.0.1:7301",
            ],
        );
        spec.known.get_mut("dr-witness").unwrap().witness = true;
        let regions = validate(&spec).expect("valid");
        assert_eq!(regions.primary, "us-east-1");
        assert_eq!(regions.known["us-east-1"].endpoints.len(), 3);
        assert!(regions.known["dr-witness"].witness);
        assert_eq!(
            (
                regions.health_check_interval_ms,
                regions.region_timeout_ms,
                regions.max_lag_ms,
                regions.verify_interval_ms,
                regions.region_lease_ms
            ),
            (1_000, 5_000, 5_000, 30_000, 5_000)
        );
        assert!(regions.auto_failover, "three regions with the witness");
    }

    #[test]
    fn a_region_is_lost_once_after_the_timeout_and_regained_once() {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let timeout = Duration::from_millis(500);
        let mut contact = Contact::new(start);
        assert_eq!(contact.missed(at(400), timeout), None, "not asked for long enough yet");
        assert!(contact.reachable(at(400), timeout));
        assert_eq!(contact.answered(at(450)), None, "never lost: nothing to report");
        assert_eq!(contact.missed(at(900), timeout), None, "449 ms of silence");
        assert_eq!(contact.missed(at(950), timeout), Some(Reach::Lost));
        assert!(!contact.reachable(at(950), timeout));
        assert_eq!(contact.missed(at(2000), timeout), None, "reported once");
        assert_eq!(contact.answered(at(2100)), Some(Reach::Regained));
        assert_eq!(contact.answered(at(2200)), None);
        assert_eq!(contact.last_answer(), Some(at(2200)));
        assert!(contact.reachable(at(2600), timeout));
    }

    #[test]
    fn a_lag_is_reported_when_it_crosses_max_lag_either_way() {
        assert_eq!(
            lag_crossed(false, Some(1_000), 1_000),
            None,
            "at the bound is within it"
        );
        assert_eq!(lag_crossed(false, Some(1_001), 1_000), Some(true));
        assert_eq!(lag_crossed(true, Some(5_000), 1_000), None, "said once");
        assert_eq!(lag_crossed(true, None, 1_000), None, "unknown changes nothing");
        assert_eq!(lag_crossed(true, Some(0), 1_000), Some(false));
        assert_eq!(lag_crossed(false, Some(0), 1_000), None);
    }

    #[test]
    fn a_region_parted_from_a_history_where_it_wrote_past_the_next_failover() {
        let start = |epoch: u64, revision: u64| EpochStart {
            epoch,
            region: "west".into(),
            revision,
            at_ms: 0,
            forced: false,
        };
        let history = [start(2, 101), start(3, 250)];
        // The old primary of epoch 1 shipped up to 100: nothing to set aside.
        assert_eq!(divergence(&history, 1, 100), None);
        // It had written 101..=107 that west never received: west's 101 is its failover.
        assert_eq!(divergence(&history, 1, 107), Some(101));
        // A region at epoch 2 parts at epoch 3's start.
        assert_eq!(divergence(&history, 2, 249), None);
        assert_eq!(divergence(&history, 2, 260), Some(250));
        assert_eq!(divergence(&history, 3, 900), None, "the same epoch: a plain follower");
        assert_eq!(divergence(&[], 1, 900), None);
    }

    #[test]
    fn a_bound_on_the_rpo_holds_by_age_or_by_count() {
        assert!(RpoBound::Ms(500).holds(0, 9_999), "caught up");
        assert!(RpoBound::Ms(500).holds(40, 500));
        assert!(!RpoBound::Ms(500).holds(1, 501));
        assert!(RpoBound::Revisions(100).holds(100, 60_000));
        assert!(!RpoBound::Revisions(100).holds(101, 0));
    }

    #[test]
    fn alone_a_region_is_its_own_primary() {
        let regions = validate(&RegionsSpec::default()).expect("valid");
        assert_eq!(regions.primary, "us-west-2");
        assert!(regions.known.is_empty());
    }

    #[test]
    fn a_bad_topology_is_refused_naming_the_field() {
        let refused = |spec: RegionsSpec| validate(&spec).expect_err("refused");
        let e = refused(spec(
            "us-east-1",
            &["us-west-2=127.0.0.1:7001", "us-east-1=127.0.0.1:7002"],
        ));
        assert_eq!(e.field, "regions.known.us-west-2");
        assert!(e.allowed.contains("not its own"), "{e}");

        let e = refused(spec("eu-central-1", &["us-east-1=127.0.0.1:7001"]));
        assert_eq!(e.field, "regions.primary");
        assert!(e.allowed.contains("us-west-2, us-east-1"), "{e}");

        let e = refused(spec("us-east-1", &["us-east-1=127.0.0.1:7001", "eu=127.0.0.1:7001"]));
        assert_eq!(e.field, "regions.known.us-east-1.endpoints[0]");
        assert!(
            e.allowed.contains("already given as regions.known.eu.endpoints[0]"),
            "{e}"
        );

        let e = refused(spec("us-east-1", &["us-east-1=127.0.0.1:7101"]));
        assert!(e.allowed.contains("this node's own address"), "{e}");

        let e = refused(spec("us-east-1", &["us-east-1=db.example:7001"]));
        assert_eq!(e.field, "regions.known.us-east-1.endpoints[0]");

        let mut no_primary = spec("x", &["us-east-1=127.0.0.1:7001"]);
        no_primary.primary = None;
        assert_eq!(refused(no_primary).field, "regions.primary");

        let mut witness = spec("w", &["w=127.0.0.1:7301"]);
        witness.known.get_mut("w").unwrap().witness = true;
        assert!(refused(witness).allowed.contains("cannot be primary"));

        let mut two = spec(
            "us-east-1",
            &["us-east-1=127.0.0.1:7001", "w=127.0.0.1:7301,127.0.0.1:7302"],
        );
        two.known.get_mut("w").unwrap().witness = true;
        assert_eq!(refused(two).field, "regions.known.w.endpoints");

        let mut slow = spec("us-east-1", &["us-east-1=127.0.0.1:7001"]);
        slow.health_check_interval = Some("3s".into());
        assert_eq!(refused(slow).field, "regions.region_timeout");

        let mut rpo = spec("us-east-1", &["us-east-1=127.0.0.1:7001"]);
        rpo.max_rpo_lag = Some(RpoBoundSpec::Duration("fast".into()));
        assert_eq!(refused(rpo.clone()).field, "regions.max_rpo_lag");
        rpo.max_rpo_lag = Some(RpoBoundSpec::Revisions(0));
        assert_eq!(refused(rpo.clone()).field, "regions.max_rpo_lag");
        rpo.max_rpo_lag = Some(RpoBoundSpec::Duration("500ms".into()));
        assert_eq!(validate(&rpo).expect("valid").max_rpo_lag, Some(RpoBound::Ms(500)));

        let mut short = spec("us-east-1", &["us-east-1=127.0.0.1:7001"]);
        short.region_lease = Some("1s".into());
        assert_eq!(refused(short).field, "regions.region_lease");

        let mut two = spec("us-east-1", &["us-east-1=127.0.0.1:7001"]);
        assert!(!validate(&two).expect("valid").auto_failover, "two regions: manual");
        two.auto_failover = Some(true);
        let e = refused(two);
        assert_eq!(e.field, "regions.auto_failover");
        assert!(e.allowed.contains("add a witness"), "{e}");

        let mut bad = RegionsSpec::default();
        assert_eq!(
            bad.set_known_from_flags(&["us-east-1".into()]).expect_err("no =").field,
            "known-region"
        );
        assert!(bad
            .set_known_from_flags(&["a=127.0.0.1:1".into(), "a=127.0.0.1:2".into()])
            .is_err());
    }
}
