//! Each scenario's fault: planned against where the primaries are when the step begins,
//! injected, and undone, on the drill's own topology or, through the operator's commands,
//! on a deployment it did not start.

use std::path::Path;
use std::time::{Duration, Instant};

use rampart_client::Client;
use rampart_core::api::FailoverRequest;
use rampart_core::drill::Scenario;

use super::journal::{self, Fault};
use super::local::{self, LocalTopology};
use super::target::Target;
use super::{postgres, remote, service, Check, RECOVERY_DEADLINE, SLOW_LINK};
use crate::relay::RelayMode;

/// Where the primaries are when a step begins.
pub(crate) struct Now {
    pub region: String,
    pub leader: String,
    /// The drill's service's primary, when it runs.
    pub instance: Option<service::InstanceRecord>,
    /// The drill's PostgreSQL's primary instance, when it runs.
    pub pg_primary: Option<postgres::PgInstance>,
}

pub(crate) async fn now(target: &Target, client: &Client) -> Result<Now, String> {
    let region = current_primary(client).await?;
    let leader = wait_leader(target, &region).await?;
    let instance = match target.local().and_then(|t| t.service.as_ref()) {
        Some(record) => {
            let id = service::serving(client, service::SERVICE).await?;
            Some(
                record
                    .instances
                    .iter()
                    .find(|i| i.id == id)
                    .cloned()
                    .ok_or(format!("the primary {id} is not one of the drill's instances"))?,
            )
        }
        None => None,
    };
    let pg_primary = match target.local().and_then(|t| t.postgres.as_ref()) {
        Some(record) => {
            let id = service::serving(client, postgres::PG_SERVICE).await?;
            Some(record.instances.iter().find(|i| i.id == id).cloned().ok_or(format!(
                "the primary {id} is not one of the drill's PostgreSQL instances"
            ))?)
        }
        None => None,
    };
    Ok(Now {
        region,
        leader,
        instance,
        pg_primary,
    })
}

/// The fault `scenario` injects now.
pub(crate) async fn plan_fault(target: &Target, scenario: Scenario, now: &Now) -> Result<Fault, String> {
    match target {
        Target::Local(topology) => plan_local(topology, scenario, now).await,
        Target::Remote(remote) => remote.plan(scenario, &now.region, &now.leader),
    }
}

/// The fault `scenario` injects now on the drill's own topology.
async fn plan_local(topology: &LocalTopology, scenario: Scenario, now: &Now) -> Result<Fault, String> {
    let (primary, leader) = (now.region.as_str(), now.leader.as_str());
    let standby = topology
        .data_regions()
        .into_iter()
        .find(|r| r != primary)
        .unwrap_or_default();
    let within = |region: &str, a: &[String]| {
        let side: Vec<String> = a.to_vec();
        let region = region.to_string();
        topology.relays_where(move |r| {
            r.to_region == region
                && r.from_node.as_ref().is_some_and(|from| {
                    // A link crossing the cut, either way.
                    side.contains(from) != side.contains(&r.to)
                })
        })
    };
    let between = |a: &str, b: &str| {
        topology.relays_where(|r| {
            r.from_node.is_none()
                && ((r.from_region == a && r.to_region == b) || (r.from_region == b && r.to_region == a))
        })
    };
    let instance = || now.instance.clone().ok_or("the drill's service is not running");
    Ok(match scenario {
        Scenario::LeaderKill => Fault::Kill {
            nodes: vec![leader.to_string()],
        },
        Scenario::LeaderPause => Fault::Pause {
            node: leader.to_string(),
            pid: topology.node(leader).pid.ok_or("the leader has no process")?,
        },
        Scenario::PartitionMinority => Fault::Links {
            relays: within(primary, &[leader.to_string()]),
            mode: RelayMode::Blackhole,
        },
        Scenario::PartitionMajority => {
            // The leader and enough others for a majority, cut off from the rest.
            let mut side = vec![leader.to_string()];
            let count = topology.region_nodes(primary).count();
            side.extend(
                topology
                    .region_nodes(primary)
                    .map(|n| n.name.clone())
                    .filter(|n| n != leader)
                    .take(count / 2),
            );
            Fault::Links {
                relays: within(primary, &side),
                mode: RelayMode::Blackhole,
            }
        }
        Scenario::PrimaryKill => {
            let instance = instance()?;
            Fault::KillInstance {
                service: service::SERVICE.into(),
                pid: service::instance_pid(instance.addr)
                    .await
                    .ok_or(format!("instance {} does not say its pid", instance.id))?,
                instance: instance.id,
            }
        }
        Scenario::NodeKill => Fault::Kill {
            nodes: vec![instance()?.node],
        },
        Scenario::ZoneLoss => {
            let zone = instance()?
                .zone
                .ok_or("the primary's node has no zone: give the topology's regions zones")?;
            Fault::Kill {
                nodes: topology
                    .nodes
                    .iter()
                    .filter(|n| n.zone.as_deref() == Some(zone.as_str()))
                    .map(|n| n.name.clone())
                    .collect(),
            }
        }
        Scenario::Switchover => {
            let from = instance()?.id;
            let record = topology.service.as_ref().ok_or("the drill's service is not running")?;
            let to = record
                .instances
                .iter()
                .map(|i| i.id.clone())
                .find(|id| *id != from)
                .ok_or("the service has no other instance")?;
            Fault::Planned {
                what: format!("switchover of {} from {from} to {to}", service::SERVICE),
                to,
            }
        }
        Scenario::RegionOutage => Fault::Kill {
            nodes: topology.region_nodes(primary).map(|n| n.name.clone()).collect(),
        },
        Scenario::PostgresPrimaryKill => {
            let primary = now.pg_primary.clone().ok_or("the drill's PostgreSQL is not running")?;
            let record = topology
                .postgres
                .as_ref()
                .ok_or("the drill's PostgreSQL is not running")?;
            Fault::KillInstance {
                service: postgres::PG_SERVICE.into(),
                pid: record
                    .postmaster_pid(&primary.id)
                    .ok_or(format!("instance {} has no postmaster.pid", primary.id))?,
                instance: primary.id,
            }
        }
        Scenario::BackupRestore => Fault::Restore {
            dir: topology.dir.join(format!("scratch-{}", journal::now_ms())),
        },
        Scenario::LinkCut => Fault::Links {
            relays: between(primary, &standby),
            mode: RelayMode::Blackhole,
        },
        Scenario::LinkSlow => Fault::Links {
            relays: between(primary, &standby),
            mode: RelayMode::Delay(SLOW_LINK),
        },
        Scenario::RegionFailover => Fault::Planned {
            what: format!("planned failover from {primary} to {standby}"),
            to: standby,
        },
        Scenario::Failback => Fault::Planned {
            what: format!("planned fail-back from {primary} to {}", topology.plan.primary()),
            to: topology.plan.primary().to_string(),
        },
    })
}

/// Injects `fault` (for the planned scenarios: asks for the operation); returns the checks
/// the operation itself answers (a restore: does it hold the backup's state).
pub(crate) async fn inject(
    target: &mut Target,
    scenario: Scenario,
    fault: &Fault,
    primary: &str,
) -> Result<Vec<Check>, String> {
    match fault {
        Fault::Commands { run, .. } => remote::run_commands(run).await?,
        Fault::Planned { to, .. } if scenario == Scenario::Switchover => {
            // The leader waits for the target to catch up (up to 30 s) before it answers.
            target
                .client()?
                .with_deadline(Duration::from_secs(60))
                .switchover(service::SERVICE, to)
                .await
                .map_err(|e| format!("the switchover to {to} was refused: {e}"))?;
        }
        Fault::Planned { to, .. } => {
            let request = FailoverRequest {
                to: to.clone(),
                allow_data_loss: false,
                dry_run: false,
            };
            // Asked of the primary region: it hands over.
            let client = target.region_client(primary)?;
            let answer = if scenario == Scenario::Failback {
                client.regions_failback(&request).await
            } else {
                client.regions_failover(&request).await
            };
            answer.map_err(|e| format!("the {scenario} to {to} was refused: {e}"))?;
        }
        local => {
            let topology = target
                .local_mut()
                .ok_or("a local fault on a deployment the drill did not start")?;
            return inject_local(topology, local, primary).await;
        }
    }
    Ok(Vec::new())
}

/// Injects a fault on the drill's own topology.
async fn inject_local(topology: &mut LocalTopology, fault: &Fault, primary: &str) -> Result<Vec<Check>, String> {
    match fault {
        Fault::Restore { dir } => return restore_scratch(topology, primary, dir).await.map(|c| vec![c]),
        Fault::Kill { nodes } => {
            for node in nodes {
                topology
                    .kill_node(node)
                    .map_err(|e| format!("cannot kill {node}: {e}"))?;
            }
        }
        Fault::Pause { node, .. } => {
            topology.pause_node(node).ok_or(format!("{node} is not running"))?;
        }
        Fault::Links { relays, mode } => topology
            .set_links(relays, *mode)
            .map_err(|e| format!("cannot set the links: {e}"))?,
        Fault::KillInstance { service, instance, pid } if service == postgres::PG_SERVICE => {
            let record = topology
                .postgres
                .as_ref()
                .ok_or("the drill's PostgreSQL is not running")?;
            if !postgres::is_postmaster_of(*pid, &record.data_dir(instance)) {
                return Err(format!("pid {pid} is no longer instance {instance}'s postmaster"));
            }
            local::signal(*pid, libc::SIGKILL);
        }
        Fault::KillInstance { instance, pid, .. } => {
            let addr = topology
                .service
                .as_ref()
                .and_then(|s| s.instances.iter().find(|i| i.id == *instance))
                .map(|i| i.addr.to_string())
                .ok_or(format!("no instance {instance}"))?;
            // Only while the PID still serves that instance's address.
            if !local::is_ours(*pid, &addr) {
                return Err(format!("pid {pid} is no longer instance {instance}"));
            }
            local::signal(*pid, libc::SIGKILL);
        }
        Fault::Planned { .. } | Fault::Commands { .. } => {}
    }
    Ok(Vec::new())
}

/// Scratch nodes of a restore.
const SCRATCH_NODES: u64 = 3;

/// `backup-restore`: a backup of the primary region now, restored into a scratch region
/// of three nodes under `dir` (`rampart backup restore`), started, and compared: the
/// scratch region must hold the backup's revision and checksum.
async fn restore_scratch(topology: &mut LocalTopology, primary: &str, dir: &Path) -> Result<Check, String> {
    let started = Instant::now();
    let manifest = topology
        .region_client(primary)
        .backup_create(Duration::from_secs(120))
        .await
        .map_err(|e| format!("the backup failed: {e}"))?;
    let backed_up = started.elapsed();
    let addresses = (0..SCRATCH_NODES)
        .map(|_| crate::free_port())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let initial: Vec<String> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let initial = initial.join(",");
    let data_dirs: Vec<std::path::PathBuf> = (1..=SCRATCH_NODES).map(|i| dir.join(format!("n{i}"))).collect();
    let mut restore = std::process::Command::new(&topology.binary);
    restore
        .args(["backup", "restore", &manifest.id, "--config"])
        .arg(topology.config_path(primary))
        .args(["--initial-cluster", &initial]);
    for data_dir in &data_dirs {
        restore.arg("--data-dir").arg(data_dir);
    }
    let out = restore.output().map_err(|e| format!("cannot run the restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the restore of backup {} failed: {}",
            manifest.id,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for (i, (addr, data_dir)) in addresses.iter().zip(&data_dirs).enumerate() {
        let args: Vec<String> = [
            "node",
            "--id",
            &(i + 1).to_string(),
            "--listen",
            &addr.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--initial-cluster",
            &initial,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        topology
            .spawn(&args, &dir.join(format!("n{}.log", i + 1)))
            .map_err(|e| format!("cannot start scratch node {}: {e}", i + 1))?;
    }
    // Every scratch node serving the backup's state.
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    let want = (manifest.revision, manifest.checksum.clone());
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen.clear();
        for addr in &addresses {
            let client = Client::new(&[addr.to_string()])
                .map_err(|e| e.to_string())?
                .with_deadline(Duration::from_millis(500));
            seen.push(client.cluster().await.ok().map(|s| (s.revision, s.checksum)));
        }
        if seen.iter().all(|s| s.as_ref() == Some(&want)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let matches = seen.iter().all(|s| s.as_ref() == Some(&want));
    Ok(Check {
        name: "the restored scratch region holds the backup's state".into(),
        passed: matches,
        detail: if matches {
            format!(
                "backup {} (revision {}, checksum {}) taken in {} ms, restored and serving on {} nodes {} ms later",
                manifest.id,
                manifest.revision,
                manifest.checksum,
                backed_up.as_millis(),
                SCRATCH_NODES,
                (started.elapsed() - backed_up).as_millis()
            )
        } else {
            format!(
                "backup {} is revision {} checksum {}; the scratch nodes say {seen:?}",
                manifest.id, manifest.revision, manifest.checksum
            )
        },
    })
}

/// Undoes `fault` on `topology`.
pub async fn undo(target: &mut Target, fault: &Fault) -> Result<(), String> {
    match fault {
        Fault::Commands { undo, .. } => remote::run_commands(undo).await,
        Fault::Planned { .. } => Ok(()),
        Fault::Restore { dir } => undo_restore(dir),
        local => {
            let topology = target
                .local_mut()
                .ok_or("a local fault on a deployment the drill did not start")?;
            undo_local(topology, local).await
        }
    }
}

/// Undoes a fault on the drill's own topology.
async fn undo_local(topology: &mut LocalTopology, fault: &Fault) -> Result<(), String> {
    match fault {
        Fault::Kill { nodes } => {
            for node in nodes {
                topology
                    .start_node(node)
                    .map_err(|e| format!("cannot start {node}: {e}"))?;
            }
        }
        Fault::Pause { node, pid } => topology.resume_node(node, *pid),
        Fault::Links { relays, .. } => topology
            .set_links(relays, RelayMode::Pass)
            .map_err(|e| format!("cannot heal the links: {e}"))?,
        // Its node brings a PostgreSQL instance back by itself, as a replica of the new
        // primary (rewound).
        Fault::KillInstance { service, .. } if service == postgres::PG_SERVICE => {}
        Fault::KillInstance { instance, .. } => topology.restart_instance(instance).await?,
        Fault::Restore { .. } | Fault::Planned { .. } | Fault::Commands { .. } => {}
    }
    Ok(())
}

/// Stops a scratch region's nodes and removes it.
pub(crate) fn undo_restore(dir: &Path) -> Result<(), String> {
    for pid in local::processes_under(dir) {
        local::signal(pid, libc::SIGKILL);
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
    }
}

pub(crate) async fn current_primary(client: &Client) -> Result<String, String> {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        match client.regions().await {
            Ok(regions) => return Ok(regions.primary),
            Err(e) if Instant::now() >= deadline => return Err(format!("cannot read the primary region: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub(crate) async fn wait_leader(target: &Target, region: &str) -> Result<String, String> {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        if let Some(leader) = target.leader(region).await {
            return Ok(leader);
        }
        if Instant::now() >= deadline {
            return Err(format!("region {region} has no leader"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fault in words.
pub fn describe(fault: &Fault) -> String {
    match fault {
        Fault::Kill { nodes } => format!("SIGKILL {}", nodes.join(", ")),
        Fault::Pause { node, pid } => format!("SIGSTOP {node} (pid {pid})"),
        Fault::Links { relays, mode } => format!("{} links set to {mode:?}", relays.len()),
        Fault::KillInstance { service, instance, pid } => format!("SIGKILL {service}/{instance} (pid {pid})"),
        Fault::Restore { dir } => format!("the newest backup restored into {}", dir.display()),
        Fault::Commands { what, .. } => what.clone(),
        Fault::Planned { what, .. } => what.clone(),
    }
}
