//! DR drills (`rampart drill`): the scenarios by their fixed names, which schedules and
//! scripts rely on, and what each breaks and how it is undone. Running them is
//! `rampart-testkit`'s and the binary's; this module only names and describes them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One fault with its undo. The names are fixed (`rampart drill list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    LeaderKill,
    LeaderPause,
    PartitionMinority,
    PartitionMajority,
    PrimaryKill,
    NodeKill,
    ZoneLoss,
    RegionOutage,
    LinkCut,
    LinkSlow,
    Switchover,
    RegionFailover,
    Failback,
    BackupRestore,
    PostgresPrimaryKill,
}

impl Scenario {
    pub const ALL: [Scenario; 15] = [
        Scenario::LeaderKill,
        Scenario::LeaderPause,
        Scenario::PartitionMinority,
        Scenario::PartitionMajority,
        Scenario::PrimaryKill,
        Scenario::NodeKill,
        Scenario::ZoneLoss,
        Scenario::RegionOutage,
        Scenario::LinkCut,
        Scenario::LinkSlow,
        Scenario::Switchover,
        Scenario::RegionFailover,
        Scenario::Failback,
        Scenario::BackupRestore,
        Scenario::PostgresPrimaryKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::LeaderKill => "leader-kill",
            Scenario::LeaderPause => "leader-pause",
            Scenario::PartitionMinority => "partition-minority",
            Scenario::PartitionMajority => "partition-majority",
            Scenario::PrimaryKill => "primary-kill",
            Scenario::NodeKill => "node-kill",
            Scenario::ZoneLoss => "zone-loss",
            Scenario::RegionOutage => "region-outage",
            Scenario::LinkCut => "link-cut",
            Scenario::LinkSlow => "link-slow",
            Scenario::Switchover => "switchover",
            Scenario::RegionFailover => "region-failover",
            Scenario::Failback => "failback",
            Scenario::BackupRestore => "backup-restore",
            Scenario::PostgresPrimaryKill => "postgres-primary-kill",
        }
    }

    /// What it breaks, in a sentence.
    pub fn fault(self) -> &'static str {
        match self {
            Scenario::LeaderKill => "SIGKILL of the primary region's Raft leader",
            Scenario::LeaderPause => "SIGSTOP of the primary region's Raft leader, past its election timeout",
            Scenario::PartitionMinority => "one node cut off from the rest of its region",
            Scenario::PartitionMajority => "a majority of the region's nodes cut off from the rest",
            Scenario::PrimaryKill => "SIGKILL of the sample service's primary process",
            Scenario::NodeKill => "SIGKILL of the node hosting the sample service's primary",
            Scenario::ZoneLoss => "every node and instance labelled with one zone killed at once",
            Scenario::RegionOutage => "every node of the primary region killed",
            Scenario::LinkCut => "the link between the primary region and a standby cut",
            Scenario::LinkSlow => "the link between the primary region and a standby delayed",
            Scenario::Switchover => "a planned switchover of the sample service's primary",
            Scenario::RegionFailover => "a planned failover to a standby region",
            Scenario::Failback => "a planned fail-back to the original primary region",
            Scenario::BackupRestore => "the newest backup restored into a scratch region, checksums compared",
            Scenario::PostgresPrimaryKill => "SIGKILL of the PostgreSQL primary's postmaster",
        }
    }

    /// How the drill undoes it.
    pub fn undo(self) -> &'static str {
        match self {
            Scenario::LeaderKill
            | Scenario::PrimaryKill
            | Scenario::NodeKill
            | Scenario::ZoneLoss
            | Scenario::RegionOutage
            | Scenario::PostgresPrimaryKill => "the killed processes are started again",
            Scenario::LeaderPause => "SIGCONT",
            Scenario::PartitionMinority | Scenario::PartitionMajority | Scenario::LinkCut | Scenario::LinkSlow => {
                "the links are healed"
            }
            Scenario::Switchover => "nothing: the new primary stays",
            Scenario::RegionFailover => "nothing: a failback scenario takes it back",
            Scenario::Failback => "nothing: the original primary region is primary again",
            Scenario::BackupRestore => "the scratch region is stopped and removed",
        }
    }
}

impl Scenario {
    /// Whether it needs a standby region (and a witness) beside the primary region.
    pub fn needs_regions(self) -> bool {
        matches!(
            self,
            Scenario::RegionOutage
                | Scenario::LinkCut
                | Scenario::LinkSlow
                | Scenario::RegionFailover
                | Scenario::Failback
        )
    }

    /// Whether it breaks the drill's sample service (and so needs it running).
    pub fn needs_service(self) -> bool {
        matches!(
            self,
            Scenario::PrimaryKill | Scenario::NodeKill | Scenario::ZoneLoss | Scenario::Switchover
        )
    }

    /// Whether it breaks the drill's PostgreSQL (and so needs it running).
    pub fn needs_postgres(self) -> bool {
        self == Scenario::PostgresPrimaryKill
    }

    /// Whether it moves the primary region.
    pub fn moves_primary_region(self) -> bool {
        matches!(
            self,
            Scenario::RegionOutage | Scenario::RegionFailover | Scenario::Failback
        )
    }

    /// Whether the safety rules promise that no acknowledged write is lost through it.
    /// A region outage is the exception: writes the lost region acknowledged but had not
    /// shipped are lost, within the RPO its failover event reports.
    pub fn promises_no_loss(self) -> bool {
        self != Scenario::RegionOutage
    }
}

/// Refuses a sequence of scenarios that cannot run in that order: a fail-back needs the
/// primary region moved by an earlier `region-failover` or `region-outage`, and the two
/// cannot both run without a fail-back between them (the second would have no standby
/// holding the original primary's data to move to). Scenarios that break the sample
/// service and scenarios that move the primary region are drilled apart.
pub fn check_sequence(scenarios: &[Scenario]) -> Result<(), String> {
    let service = scenarios.iter().find(|s| s.needs_service() || s.needs_postgres());
    let region = scenarios.iter().find(|s| s.moves_primary_region());
    if let (Some(service), Some(region)) = (service, region) {
        // The drill's service has its instances in the first primary region only.
        return Err(format!(
            "scenarios {service} and {region} cannot run in one drill: run the service scenarios and the region scenarios as two drills"
        ));
    }
    let mut moved = false;
    for (i, scenario) in scenarios.iter().enumerate() {
        match scenario {
            Scenario::RegionFailover | Scenario::RegionOutage if moved => {
                return Err(format!(
                    "scenario {} (step {}): the primary region has already moved; run failback first",
                    scenario,
                    i + 1
                ))
            }
            Scenario::RegionFailover | Scenario::RegionOutage => moved = true,
            Scenario::Failback if !moved => {
                return Err(format!(
                    "scenario failback (step {}) needs region-failover or region-outage before it",
                    i + 1
                ))
            }
            Scenario::Failback => moved = false,
            _ => {}
        }
    }
    Ok(())
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(text: &str) -> Result<Scenario, String> {
        Scenario::ALL.into_iter().find(|s| s.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario {text:?}: one of {}", names.join(", "))
        })
    }
}

/// One scenario as `rampart drill list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScenarioInfo {
    pub name: Scenario,
    pub fault: String,
    pub undo: String,
}

/// Every scenario, in the order of [`Scenario::ALL`].
pub fn catalogue() -> Vec<ScenarioInfo> {
    Scenario::ALL
        .into_iter()
        .map(|s| ScenarioInfo {
            name: s,
            fault: s.fault().to_string(),
            undo: s.undo().to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_names_read_back_and_serialize_as_written() {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "leader-kill",
                "leader-pause",
                "partition-minority",
                "partition-majority",
                "primary-kill",
                "node-kill",
                "zone-loss",
                "region-outage",
                "link-cut",
                "link-slow",
                "switchover",
                "region-failover",
                "failback",
                "backup-restore",
                "postgres-primary-kill",
            ]
        );
        for scenario in Scenario::ALL {
            assert_eq!(scenario.name().parse::<Scenario>(), Ok(scenario));
            assert_eq!(
                serde_json::to_string(&scenario).unwrap(),
                format!("\"{}\"", scenario.name())
            );
        }
        let refused = "leader-kil".parse::<Scenario>().unwrap_err();
        assert!(
            refused.contains("unknown scenario \"leader-kil\": one of leader-kill, "),
            "{refused}"
        );
        assert_eq!(catalogue().len(), 15);
    }

    #[test]
    fn a_failback_needs_the_primary_moved_first_and_a_move_needs_a_failback_before_the_next() {
        use Scenario::*;
        assert_eq!(
            check_sequence(&[LeaderKill, RegionFailover, Failback, RegionOutage, Failback]),
            Ok(())
        );
        let refused = check_sequence(&[LeaderKill, Failback]).unwrap_err();
        assert!(refused.contains("failback (step 2) needs region-failover"), "{refused}");
        let refused = check_sequence(&[RegionFailover, RegionOutage]).unwrap_err();
        assert!(refused.contains("region-outage (step 2)"), "{refused}");
        assert!(check_sequence(&[RegionFailover, Failback, Failback]).is_err());
        let refused = check_sequence(&[PrimaryKill, RegionFailover, Failback]).unwrap_err();
        assert!(refused.contains("as two drills"), "{refused}");
        assert_eq!(
            check_sequence(&[PrimaryKill, NodeKill, ZoneLoss, Switchover, LinkCut]),
            Ok(())
        );
        assert!(check_sequence(&[PostgresPrimaryKill, RegionOutage, Failback]).is_err());
        assert!(RegionOutage.needs_regions() && !LeaderKill.needs_regions());
        assert!(!RegionOutage.promises_no_loss() && LinkCut.promises_no_loss());
    }
}
