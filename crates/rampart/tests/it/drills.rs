//! `rampart drill` end to end: each scenario against a topology the drill starts itself,
//! with the figures its report holds; the HTML report opened in headless Chromium; a drill
//! SIGKILLed half-way, its faults undone by `drill cleanup` and its topology healthy after.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rampart_testkit::drill::journal::{self, Fault};
use rampart_testkit::drill::local::LocalTopology;
use rampart_testkit::drill::Report;

use crate::cli::run;
use crate::{binary, DEADLINE};

/// Runs `rampart drill run SCENARIOS` into `dir` with a generous RTO budget (the tests check
/// the figures are there and the checks pass, not how fast a loaded machine recovers).
fn drill(dir: &Path, scenarios: &[&str], extra: &[&str]) -> Report {
    let mut args: Vec<&str> = scenarios.to_vec();
    args.extend(["--rto-budget", "60s"]);
    args.extend_from_slice(extra);
    drill_with(dir, &args, scenarios)
}

/// Runs `rampart drill run ARGS` into `dir`; the report must have passed with `scenarios`.
fn drill_with(dir: &Path, run_args: &[&str], scenarios: &[&str]) -> Report {
    let dir_text = dir.display().to_string();
    let mut args = vec!["--output", "json", "drill", "run"];
    args.extend_from_slice(run_args);
    // Faults held 2 s: long enough for an election, short enough for the suite.
    args.extend(["--hold", "2s", "--report-dir", &dir_text]);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: Report = serde_json::from_str(&out).expect("a json report");
    assert!(report.passed && report.aborted.is_none(), "{out}");
    let names: Vec<&str> = report.steps.iter().map(|s| s.scenario.name()).collect();
    assert_eq!(names, scenarios);
    for step in &report.steps {
        assert!(step.rto_ms.is_some(), "{step:?}");
        assert!(step.acknowledged >= 40, "{step:?}");
        assert!(step.checks.iter().all(|c| c.passed), "{step:?}");
        assert!(!step.samples.is_empty() && !step.paths.is_empty(), "{step:?}");
        assert!(
            step.paths.iter().all(|p| p.rto_ms.is_some() && !p.writes.is_empty()),
            "{step:?}"
        );
        assert!(step.marks.iter().any(|m| m.label.starts_with("fault")), "{step:?}");
        assert!(step.marks.iter().any(|m| m.label.starts_with("recovered")), "{step:?}");
    }
    // A passed drill keeps its report and journal, not its topology's data.
    assert!(dir.join("report.html").exists() && dir.join("report.md").exists());
    assert!(!dir.join("topology").exists());
    assert!(journal::pending(dir).expect("journal").is_empty());
    report
}

/// Debian's Chromium, installed by scripts/install-test-tools.
fn chromium() -> &'static str {
    let found = Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "no chromium: run scripts/test (or scripts/install-test-tools) first"
    );
    "chromium"
}

/// Opens `page` in headless Chromium: its DOM after loading, and what Chromium logged.
fn open_headless(page: &Path, extra: &[String]) -> (String, String) {
    let profile = tempfile::tempdir().expect("tempdir");
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .args(["--enable-logging=stderr", "--v=0", "--window-size=1000,2400"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_single_region_scenario_is_measured_and_the_html_report_renders_in_chromium() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("drills").join("first");
    // A plan with its own topology file (five nodes) and a budget of its own for one step.
    std::fs::write(
        root.path().join("five.toml"),
        "[[regions]]\nname = \"east\"\nnodes = 5\nzones = [\"a\", \"b\", \"c\"]\n",
    )
    .expect("write the topology");
    let plan = root.path().join("plan.toml");
    std::fs::write(
        &plan,
        r#"[drill]
topology = "five.toml"
rto_budget = "60s"

[[drill.steps]]
scenario = "leader-kill"

[[drill.steps]]
scenario = "leader-pause"
rto_budget = "90s"

[[drill.steps]]
scenario = "partition-minority"
settle = "1s"

[[drill.steps]]
scenario = "partition-majority"

[[drill.steps]]
scenario = "backup-restore"
"#,
    )
    .expect("write the plan");
    let plan_text = plan.display().to_string();
    let report = drill_with(
        &dir,
        &["--plan", &plan_text],
        &[
            "leader-kill",
            "leader-pause",
            "partition-minority",
            "partition-majority",
            "backup-restore",
        ],
    );
    let restored = report.steps[4]
        .checks
        .iter()
        .find(|c| c.name.starts_with("the restored scratch region"));
    assert!(
        restored.is_some_and(|c| c.passed && c.detail.contains("serving on 3 nodes")),
        "{:?}",
        report.steps[4]
    );
    for step in &report.steps {
        let register = step.checks.iter().find(|c| c.name == "a linearizable register");
        assert!(
            register.is_some_and(|c| c.detail.contains("each history linearizable")),
            "{step:?}"
        );
    }
    // The partition held long enough for the rest of the region to elect another leader.
    let terms: Vec<u64> = report.steps[2]
        .samples
        .iter()
        .map(|s| s.term)
        .filter(|t| *t > 0)
        .collect();
    assert!(terms.last() > terms.first(), "{terms:?}");
    let budgets: Vec<u64> = report.steps.iter().map(|s| s.budgets.rto_ms).collect();
    assert_eq!(budgets, [60_000, 90_000, 60_000, 60_000, 60_000]);
    // The majority side of five is three: every link between them and the other two is cut,
    // both ways (3 x 2 x 2 relays).
    assert!(
        report.steps[3].fault.starts_with("12 links"),
        "{}",
        report.steps[3].fault
    );
    assert!(
        report.steps[0].fault.starts_with("SIGKILL east-"),
        "{}",
        report.steps[0].fault
    );

    // The page loads with nothing missing (it fetches nothing) and draws every timeline.
    let page = dir.join("report.html");
    let (dom, log) = open_headless(&page, &["--dump-dom".to_string()]);
    assert!(dom.contains("Rampart drill"), "{dom}");
    let charts: usize = report
        .steps
        .iter()
        .map(|s| 3 + s.paths.len() + s.paths.iter().filter(|p| !p.holders.is_empty()).count())
        .sum();
    assert_eq!(dom.matches("<svg").count(), charts, "{dom}");
    for bad in ["Failed to load resource", "Uncaught", "CONSOLE("] {
        assert!(!log.contains(bad), "{bad} in Chromium's log:\n{log}");
    }
    let shot = dir.join("report.png");
    open_headless(&page, &[format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());

    // `drill history` lists it from the directory of drills.
    let drills = root.path().join("drills").display().to_string();
    let (code, out, err) = run(&["drill", "history", &drills]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("passed") && out.contains("leader-kill,leader-pause,partition-minority,partition-majority"),
        "{out}"
    );
    let (code, out, err) = run(&[
        "--output",
        "json",
        "drill",
        "history",
        "--data-dir",
        &root.path().display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{out}");
}

#[test]
fn the_region_scenarios_are_measured_and_a_region_outage_reports_its_rpo() {
    let root = tempfile::tempdir().expect("tempdir");
    let report = drill(
        root.path(),
        &[
            "link-cut",
            "link-slow",
            "region-outage",
            "failback",
            "region-failover",
            "failback",
        ],
        // A region outage loses what east acknowledged and had not shipped: its RPO, held to
        // the budget, not a broken rule.
        &["--rpo-budget", "100000"],
    );
    let outage = &report.steps[2];
    let said = outage.reported_rpo.as_deref().expect("the failover's words");
    assert!(
        said.contains("west is the primary region") && said.contains("RPO"),
        "{said}"
    );
    // Each planned move reports what its failover said, and ends where it should.
    assert!(report.steps[3]
        .reported_rpo
        .as_deref()
        .unwrap_or_default()
        .contains("east is the primary"));
    assert!(report.steps[4]
        .reported_rpo
        .as_deref()
        .unwrap_or_default()
        .contains("west is the primary"));
    assert!(report.steps[5]
        .reported_rpo
        .as_deref()
        .unwrap_or_default()
        .contains("east is the primary"));
    let epochs: Vec<u64> = report.steps[5].samples.iter().map(|s| s.epoch).collect();
    assert!(epochs.iter().max() >= Some(&5), "{epochs:?}");
}

#[test]
fn the_service_scenarios_are_measured_through_the_api_and_the_proxy_with_one_primary_at_a_time() {
    let root = tempfile::tempdir().expect("tempdir");
    // The drill's sample service replicates asynchronously: what a kill loses is its RPO,
    // counted against the budget, not a broken rule.
    let report = drill(
        root.path(),
        &["primary-kill", "node-kill", "zone-loss", "switchover"],
        &["--rpo-budget", "100000"],
    );
    for step in &report.steps {
        let paths: Vec<&str> = step.paths.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["api", "proxy"], "{step:?}");
        let api = &step.paths[0];
        assert_eq!(api.lost, 0, "{step:?}");
        assert!(!step.paths[1].holders.is_empty(), "{step:?}");
        let tokens = step
            .checks
            .iter()
            .find(|c| c.name.starts_with("no two primaries"))
            .expect("the two-primaries check");
        assert!(tokens.passed, "{tokens:?}");
    }
    // The switchover shows in the tokens: the target acknowledges under a newer one.
    let switched = &report.steps[3].paths[1].holders;
    let (first, last) = (switched.first().expect("holders"), switched.last().expect("holders"));
    assert!(
        last.token > first.token && last.instance != first.instance,
        "{switched:?}"
    );
    assert!(
        report.steps[0].fault.starts_with("SIGKILL drill-kv/s-"),
        "{}",
        report.steps[0].fault
    );
    assert!(
        report.steps[1].fault.starts_with("SIGKILL east-"),
        "{}",
        report.steps[1].fault
    );
    assert!(
        report.steps[2].fault.starts_with("SIGKILL east-"),
        "{}",
        report.steps[2].fault
    );
    assert!(
        report.steps[3].fault.starts_with("switchover of drill-kv from s-"),
        "{}",
        report.steps[3].fault
    );
}

#[test]
fn a_postgresql_primary_killed_under_inserts_through_the_proxy_loses_no_acknowledged_row() {
    let root = tempfile::tempdir().expect("tempdir");
    let report = drill(root.path(), &["postgres-primary-kill"], &[]);
    let step = &report.steps[0];
    assert!(step.fault.starts_with("SIGKILL drill-db/pg-"), "{}", step.fault);
    let paths: Vec<&str> = step.paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["api", "sql"], "{step:?}");
    let sql = &step.paths[1];
    assert!(sql.acknowledged > 0 && sql.lost == 0, "{sql:?}");
    let rows = step
        .checks
        .iter()
        .find(|c| c.name.starts_with("no acknowledged row lost"))
        .expect("the SQL check");
    assert!(rows.passed, "{rows:?}");
    // PostgreSQL's directory went with the topology.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("rampart-drill-pg-"))
        .filter(|e| e.path().join("pg-1").exists())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Polls `check` every 50 ms until it holds, for at most `DEADLINE`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state letter of process `pid` (`T`: stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().next()?.chars().next()
}

#[test]
fn ctrl_c_during_a_fault_undoes_it_stops_the_topology_and_exits_non_zero() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("interrupted");
    let drill = Command::new(binary())
        .args(["drill", "run", "leader-pause", "--report-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the drill");
    let paused = std::cell::Cell::new(None);
    wait_until("the drill to pause a leader", || {
        let pending = journal::pending(&dir).unwrap_or_default();
        let found = pending.iter().find_map(|(_, _, fault)| match fault {
            Fault::Pause { pid, .. } => Some(*pid),
            _ => None,
        });
        let stopped = found.is_some_and(|pid| process_state(pid) == Some('T'));
        if stopped {
            paused.set(found);
        }
        stopped
    });
    // SAFETY: the drill process this test started.
    unsafe {
        libc::kill(drill.id() as i32, libc::SIGINT);
    }
    let out = drill.wait_with_output().expect("the drill ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(journal::pending(&dir).expect("journal").is_empty(), "{err}");
    let topology = LocalTopology::load(&dir.join("topology")).expect("the topology");
    assert!(topology.stopped, "{err}");
    let pid = paused.take().expect("a paused node");
    wait_until(
        "the paused node to be gone",
        || !matches!(process_state(pid), Some(s) if s != 'Z'),
    );
}

#[test]
fn a_drill_killed_half_way_leaves_faults_that_cleanup_undoes_and_the_topology_is_healthy_after() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("killed");
    let mut drill = Command::new(binary())
        .args(["drill", "run", "partition-minority", "leader-pause", "--report-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the drill");
    // Killed once the leader is paused: the partition before it was undone, the pause not.
    let paused = std::cell::Cell::new(None);
    wait_until("the drill to pause a leader", || {
        let pending = journal::pending(&dir).unwrap_or_default();
        let found = pending.iter().find_map(|(_, _, fault)| match fault {
            Fault::Pause { node, pid } => Some((node.clone(), *pid)),
            _ => None,
        });
        let stopped = found.as_ref().is_some_and(|(_, pid)| process_state(*pid) == Some('T'));
        if stopped {
            paused.set(found);
        }
        stopped
    });
    drill.kill().expect("SIGKILL the drill");
    drill.wait().expect("reap the drill");
    let (node, pid) = paused.take().expect("a paused node");
    assert_eq!(process_state(pid), Some('T'), "{node} stays paused");
    assert_eq!(journal::pending(&dir).expect("journal").len(), 1);

    let dir_text = dir.display().to_string();
    let (code, out, err) = run(&["drill", "cleanup", &dir_text, "--keep"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("undone: leader-pause") && out.contains("healthy"), "{out}");
    assert_ne!(process_state(pid), Some('T'), "{node} resumed");
    assert!(journal::pending(&dir).expect("journal").is_empty());

    // Healthy by its own processes too: every node answers, one leader, one state.
    let topology = LocalTopology::load(&dir.join("topology")).expect("the topology");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime
        .block_on(topology.wait_healthy(DEADLINE))
        .expect("healthy after the clean-up");
    let pids: Vec<u32> = topology.nodes.iter().filter_map(|n| n.pid).collect();
    assert_eq!(pids.len(), 3);

    // A second clean-up has nothing to undo and stops the topology.
    let (code, out, err) = run(&["drill", "cleanup", &dir_text]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("no fault left to undo") && out.contains("stopped"),
        "{out}"
    );
    wait_until("every node of the topology to exit", || {
        pids.iter()
            .all(|pid| !matches!(process_state(*pid), Some(s) if s != 'Z'))
    });
}

/// `links.py cut|heal A B DIR`: sets the relays between nodes A and B of the topology in
/// DIR to blackhole or pass, as an operator's `cut` and `heal` would change a firewall.
const LINKS_PY: &str = r#"import json, os, sys
op, a, b, d = sys.argv[1:5]
relays = json.load(open(os.path.join(d, "topology.json")))["relays"]
modes = json.load(open(os.path.join(d, "links.json")))
for i, r in enumerate(relays):
    if (r.get("from_node"), r["to"]) in ((a, b), (b, a)):
        modes[i] = "blackhole" if op == "cut" else "pass"
tmp = os.path.join(d, "links.json.tmp")
with open(tmp, "w") as f:
    json.dump(modes, f)
os.rename(tmp, os.path.join(d, "links.json"))
"#;

#[test]
fn a_deployment_the_drill_did_not_start_is_drilled_through_the_operators_commands() {
    let root = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The "deployment": a region the test starts, whose nodes only the commands touch.
    let plan = rampart_testkit::drill::local::TopologyPlan::one_region();
    let deployed = root.path().join("deployed");
    let mut topology = LocalTopology::start(Path::new(binary()), &plan, &deployed, false).expect("start");
    runtime.block_on(topology.wait_healthy(DEADLINE)).expect("healthy");
    let ops = root.path().join("ops");
    std::fs::create_dir_all(&ops).expect("ops dir");
    for node in &topology.nodes {
        std::fs::write(
            ops.join(format!("{}.pid", node.name)),
            node.pid.expect("running").to_string(),
        )
        .expect("pid");
        let args: Vec<String> = node.args.iter().map(|a| format!("'{a}'")).collect();
        std::fs::write(
            ops.join(format!("start-{}.sh", node.name)),
            format!(
                "setsid '{}' {} >> '{}' 2>&1 < /dev/null &\necho $! > '{}'\n",
                binary(),
                args.join(" "),
                node.data_dir.join("node.log").display(),
                ops.join(format!("{}.pid", node.name)).display()
            ),
        )
        .expect("start script");
    }
    std::fs::write(ops.join("links.py"), LINKS_PY).expect("links.py");
    let dir = topology.dir.display().to_string();
    let ops_text = ops.display().to_string();
    let commands = root.path().join("commands.toml");
    std::fs::write(
        &commands,
        format!(
            r#"kill = "kill -KILL $(cat {ops_text}/{{name}}.pid)"
start = "sh {ops_text}/start-{{name}}.sh"
pause = "kill -STOP $(cat {ops_text}/{{name}}.pid)"
resume = "kill -CONT $(cat {ops_text}/{{name}}.pid)"
cut = "python3 {ops_text}/links.py cut {{name}} {{peer_name}} {dir}"
heal = "python3 {ops_text}/links.py heal {{name}} {{peer_name}} {dir}"
"#
        ),
    )
    .expect("commands");
    let endpoints = topology
        .nodes
        .iter()
        .map(|n| n.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let report_dir = root.path().join("report");
    let (code, out, err) = run(&[
        "--output",
        "json",
        "--endpoints",
        &endpoints,
        "drill",
        "run",
        "leader-kill",
        "leader-pause",
        "partition-minority",
        "--commands",
        &commands.display().to_string(),
        "--hold",
        "2s",
        "--rto-budget",
        "60s",
        "--report-dir",
        &report_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: Report = serde_json::from_str(&out).expect("a json report");
    assert!(report.passed, "{out}");
    let faults: Vec<&str> = report.steps.iter().map(|s| s.fault.as_str()).collect();
    assert!(faults[0].starts_with("kill east-"), "{faults:?}");
    assert!(faults[1].starts_with("pause east-"), "{faults:?}");
    assert!(
        faults[2].starts_with("cut east-") && faults[2].ends_with("off from the rest of east"),
        "{faults:?}"
    );
    assert!(report.steps.iter().all(|s| s.rto_ms.is_some() && s.lost == 0), "{out}");
    // Every link healed, every node back (the killed one by its start command).
    let modes: Vec<String> =
        serde_json::from_slice(&std::fs::read(topology.dir.join("links.json")).expect("links")).expect("modes");
    assert!(modes.iter().all(|m| m == "pass"), "{modes:?}");
    let pids: Vec<u32> = topology
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(ops.join(format!("{}.pid", n.name)))
                .expect("pid")
                .trim()
                .parse()
                .expect("a pid")
        })
        .collect();
    assert!(
        pids.iter()
            .all(|pid| matches!(process_state(*pid), Some(s) if s != 'Z' && s != 'T')),
        "{pids:?}"
    );

    // A scenario the commands cannot give is refused before anything runs.
    let (code, _, err) = run(&[
        "--endpoints",
        &endpoints,
        "drill",
        "run",
        "zone-loss",
        "--commands",
        &commands.display().to_string(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not available with --endpoints"), "{err}");
    // A template naming a placeholder it cannot have is refused naming the field.
    let bad = root.path().join("bad.toml");
    std::fs::write(&bad, "kill = \"kill {peer_host}\"\n").expect("write");
    let (code, _, err) = run(&[
        "--endpoints",
        &endpoints,
        "drill",
        "run",
        "leader-kill",
        "--commands",
        &bad.display().to_string(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kill: unknown placeholder {peer_host}"), "{err}");
    // --endpoints without the commands, or the commands without a deployment: refused.
    let (code, _, err) = run(&["--endpoints", &endpoints, "drill", "run", "leader-kill"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give --commands FILE"), "{err}");
    let (code, _, err) = run(&[
        "drill",
        "run",
        "leader-kill",
        "--commands",
        &commands.display().to_string(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("name it with --endpoints"), "{err}");

    // A killed remote drill's rendered undo runs at `drill cleanup`, with no topology.
    let orphan = root.path().join("orphan");
    std::fs::create_dir_all(&orphan).expect("dir");
    let mended = root.path().join("mended");
    let fault = serde_json::json!({"event": "injecting", "step": 1, "scenario": "leader-pause",
        "fault": {"kind": "commands", "what": "pause east-9", "run": ["true"],
                  "undo": [format!("touch {}", mended.display())]}, "at_ms": 1});
    std::fs::write(orphan.join("journal.jsonl"), format!("{fault}\n")).expect("journal");
    let (code, out, err) = run(&["drill", "cleanup", &orphan.display().to_string()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        mended.exists() && out.contains("undone: leader-pause: pause east-9"),
        "{out}"
    );
    assert!(journal::pending(&orphan).expect("journal").is_empty());

    for pid in pids {
        // SAFETY: the nodes this test started (through its start scripts).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    topology.stop().expect("stop the relays");
}

#[test]
fn a_repeated_drill_summarises_each_scenarios_median_and_worst() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("bench");
    let (code, out, err) = run(&[
        "--output",
        "json",
        "drill",
        "run",
        "leader-kill",
        "--repeat",
        "2",
        "--hold",
        "2s",
        "--rto-budget",
        "60s",
        "--report-dir",
        &dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let summary: Vec<rampart_testkit::drill::report::ScenarioSummary> = serde_json::from_str(&out).expect("json");
    assert_eq!(summary.len(), 1, "{out}");
    let kill = &summary[0];
    assert_eq!((kill.runs, kill.passed, kill.lost_worst), (2, 2, 0), "{kill:?}");
    assert!(
        kill.rto_worst_ms >= kill.rto_median_ms && kill.rto_median_ms.is_some(),
        "{kill:?}"
    );
    let markdown = std::fs::read_to_string(dir.join("summary.md")).expect("summary.md");
    assert!(markdown.contains("| leader-kill | 2 |"), "{markdown}");
    for run in ["run-1", "run-2"] {
        assert!(dir.join(run).join("report.json").exists(), "{run}");
    }
}
