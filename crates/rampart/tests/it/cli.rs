//! The CLI: bad flags and config exit 2 naming the setting; the demo runs end to end;
//! commands work against a live region.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, cluster, DEADLINE};

/// Runs the CLI; (exit code, stdout, stderr). A command still running after
/// [`CLI_DEADLINE`] (a node that should have refused to start, say) is killed and reported
/// with code -1, so a test fails instead of hanging.
pub(crate) fn run(args: &[&str]) -> (i32, String, String) {
    use std::io::Read;
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("RAMPART_ENDPOINTS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rampart");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + CLI_DEADLINE;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for rampart") {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, mut err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    if code == -1 {
        err.push_str(&format!(
            "\n(rampart {args:?} still running after {CLI_DEADLINE:?}: killed)"
        ));
    }
    (code, out, err)
}

/// Longest a CLI command may run in a test.
const CLI_DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn bad_node_flags_exit_2_naming_setting_value_and_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (
            &["node", "--id", "x", "--listen", "127.0.0.1:1", "--data-dir", data],
            "invalid --id \"x\"",
        ),
        (
            &["node", "--id", "1", "--listen", "nowhere", "--data-dir", data],
            "invalid --listen \"nowhere\"",
        ),
        (
            &[
                "node",
                "--id",
                "1",
                "--listen",
                "127.0.0.1:1",
                "--data-dir",
                data,
                "--heartbeat-interval",
                "50",
            ],
            "invalid --heartbeat-interval \"50\": expected a duration",
        ),
        (
            &[
                "node",
                "--id",
                "1",
                "--listen",
                "127.0.0.1:1",
                "--data-dir",
                data,
                "--initial-cluster",
                "1=127.0.0.1:1,2=x",
            ],
            "invalid --initial-cluster \"2=x\": expected ID=HOST:PORT",
        ),
        (
            &["node", "--listen", "127.0.0.1:1", "--data-dir", data],
            "invalid --id \"\": this setting is required",
        ),
        (&["node", "--no-such-flag"], "unexpected argument"),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = run(args);
        assert_eq!(code, 2, "{args:?} should exit 2; stderr: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: stderr {stderr:?} lacks {expected:?}"
        );
    }
}

#[test]
fn bad_config_file_exits_2_and_env_overrides_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("rampart.toml");
    std::fs::write(
        &config,
        "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nheartbeat = \"50ms\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["node", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown setting \"heartbeat\""), "{stderr}");

    std::fs::write(&config, "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n").unwrap();
    let out = Command::new(binary())
        .args(["node", "--config", config.to_str().unwrap()])
        .env("RAMPART_ELECTION_TIMEOUT", "10ms")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --election-timeout \"10ms\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_reads_and_writes_a_live_region() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let endpoints = cluster.endpoints().join(",");
    let cli = |args: &[&str]| {
        let mut all = vec!["--endpoints", endpoints.as_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    let (code, out, err) = cli(&["kv", "put", "cli/a", "hello"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("revision "), "{out}");
    let (code, out, _) = cli(&["kv", "get", "cli/a"]);
    assert_eq!((code, out.trim()), (0, "hello"));
    let (code, out, _) = cli(&["--output", "json", "kv", "get", "cli/a"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(json["value"], "hello");
    let (code, _, err) = cli(&["kv", "get", "cli/missing"]);
    assert_eq!(code, 1, "{err}");
    let (code, out, _) = cli(&["--output", "json", "status"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json status");
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
    let (code, out, _) = cli(&["lease", "grant", "5s"]);
    assert_eq!(code, 0);
    let lease = out.split_whitespace().nth(1).expect("lease id").to_string();
    let (code, out, err) = cli(&["elect", "campaign", "cli-job", "me", "--lease", &lease]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("me leads cli-job with token"), "{out}");
    let (code, out, _) = cli(&["members", "list"]);
    assert_eq!((code, out.lines().count()), (0, 3));
}

#[test]
fn demo_reports_failover_and_no_lost_writes() {
    let (code, out, err) = run(&["demo", "--exit-after-report"]);
    assert_eq!(code, 0, "demo failed: {out}\n{err}");
    assert!(out.contains("new leader: node"), "{out}");
    assert!(out.contains("lost: 0"), "{out}");
    assert!(out.contains("all 3 nodes caught up"), "{out}");
    assert!(out.contains("new primary: s-"), "{out}");
    assert!(out.contains("service RTO"), "{out}");
    assert!(
        out.contains("(synchronous: every acknowledged write was on s-2 before it was acknowledged)"),
        "{out}"
    );
    assert!(out.contains("restored state matches the backup"), "{out}");
    assert!(out.contains("verified: west equals east at revision"), "{out}");
    assert!(out.contains("witness  witness  reachable true"), "{out}");
    assert!(out.contains("(read_only_region, HTTP 503)"), "{out}");
    // The region outage: west takes over, east comes back and the regions fail back.
    assert!(out.contains("west is the primary region at epoch 2"), "{out}");
    assert!(
        out.contains("region RTO (kill -> first write acknowledged by west)"),
        "{out}"
    );
    assert!(out.contains("east is back as a standby of west at epoch 2"), "{out}");
    assert!(out.contains("fail-back to east (planned) at epoch 3"), "{out}");
    assert!(out.contains("acknowledged writes lost: 0 of"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_node_on_a_data_dir_in_use_is_refused_saying_so() {
    let cluster = cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    let node = &cluster.nodes[&1];
    let other = rampart_testkit::free_port().expect("port");
    let (code, _, err) = run(&[
        "node",
        "--id",
        "1",
        "--listen",
        &other.to_string(),
        "--data-dir",
        node.data_dir.to_str().expect("utf-8"),
        "--initial-cluster",
        &format!("1={other}"),
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("is another node running on this data dir?"), "{err}");
    // The running node is untouched.
    cluster
        .client()
        .put("in-use/k", "v", rampart_client::PutOptions::default())
        .await
        .expect("the first node still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_dir_of_another_format_version_is_refused_naming_both_versions() {
    let mut cluster = cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    cluster
        .client()
        .put("format/k", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");
    let node = &cluster.nodes[&1];
    let (data_dir, addr) = (node.data_dir.clone(), node.addr);
    cluster.kill(1);
    let redb = data_dir.join("rampart.redb");
    let newer = rampart_store::FORMAT_VERSION + 1;
    rampart_store::stamp_format_version(&redb, newer).expect("stamp the format version");

    let initial = format!("1={addr}");
    let (code, _, err) = run(&[
        "node",
        "--id",
        "1",
        "--listen",
        &addr.to_string(),
        "--data-dir",
        data_dir.to_str().expect("utf-8"),
        "--initial-cluster",
        &initial,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("format version {newer}"))
            && err.contains(&format!("format version {}", rampart_store::FORMAT_VERSION)),
        "names both versions: {err}"
    );
    // Nothing was lost: as this release's format again, the node starts with its data.
    rampart_store::stamp_format_version(&redb, rampart_store::FORMAT_VERSION).expect("stamp it back");
    cluster.restart(1).expect("restart");
    cluster.wait_for_leader(DEADLINE).await;
    let kept = cluster.client().get_key("format/k", false).await.expect("get");
    assert_eq!(kept.map(|kv| kv.value), Some("v".to_string()));
}

/// A bad region topology exits 2 naming the field, from flags, the variable or the file,
/// before the node touches its data dir.
#[test]
fn a_bad_region_topology_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let node = |extra: &[&str]| {
        let mut args = vec![
            "node",
            "--id",
            "1",
            "--region",
            "us-west-2",
            "--listen",
            "127.0.0.1:7101",
        ];
        args.extend(["--data-dir", data]);
        args.extend(extra);
        run(&args)
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["--primary-region", "us-west-2", "--known-region", "us-west-2=127.0.0.1:7001"],
            "invalid regions.known.us-west-2 \"us-west-2\": a node lists the other regions, not its own",
        ),
        (
            &["--primary-region", "eu-central-1", "--known-region", "us-east-1=127.0.0.1:7001"],
            "invalid regions.primary \"eu-central-1\": one of the regions this node knows: us-west-2, us-east-1",
        ),
        (
            &[
                "--primary-region",
                "us-east-1",
                "--known-region",
                "us-east-1=127.0.0.1:7001,127.0.0.1:7002",
                "--known-region",
                "dr-witness=127.0.0.1:7002",
            ],
            "invalid regions.known.us-east-1.endpoints[1] \"127.0.0.1:7002\": already given as regions.known.dr-witness.endpoints[0]",
        ),
        (
            &["--known-region", "us-east-1=127.0.0.1:7001"],
            "invalid regions.primary \"\": required when other regions are known",
        ),
        (&["--known-region", "us-east-1"], "invalid known-region \"us-east-1\""),
    ];
    for (extra, expected) in cases {
        let (code, _, stderr) = node(extra);
        assert_eq!(code, 2, "{extra:?} should exit 2; stderr: {stderr}");
        assert!(
            stderr.contains(expected),
            "{extra:?}: stderr {stderr:?} lacks {expected:?}"
        );
    }
    assert!(!Path::new(data).exists(), "refused before the data dir was made");

    // The variable holds every known region, split at ';'.
    let out = Command::new(binary())
        .args([
            "node",
            "--id",
            "1",
            "--region",
            "us-west-2",
            "--listen",
            "127.0.0.1:7101",
        ])
        .args(["--data-dir", data, "--primary-region", "us-east-1"])
        .env(
            "RAMPART_KNOWN_REGIONS",
            "us-east-1=127.0.0.1:7001;dr-witness=127.0.0.1:7001",
        )
        .output()
        .expect("run rampart");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("already given as regions.known.dr-witness.endpoints[0]"),
        "{stderr}"
    );

    // The file: [regions] and [regions.known.NAME], fields checked by name.
    let config = dir.path().join("node.toml");
    let write_and_run = |text: &str| {
        std::fs::write(&config, text).expect("config");
        node(&["--config", config.to_str().expect("utf-8")])
    };
    let (code, _, stderr) = write_and_run(
        "[regions]\nprimary = \"us-east-1\"\n[regions.known.us-east-1]\nendpoints = [\"db.example:7001\"]\n",
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid regions.known.us-east-1.endpoints[0] \"db.example:7001\""),
        "{stderr}"
    );
    let (code, _, stderr) = write_and_run(
        "[regions]\nprimary = \"w\"\n[regions.known.w]\nendpoints = [\"127.0.0.1:7301\"]\nwitness = true\n",
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("a witness keeps no data and cannot be primary"),
        "{stderr}"
    );
    let (code, _, stderr) = write_and_run("[regions]\nprimary = \"us-west-2\"\nmax_lagg = \"5s\"\n");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("[regions]") && stderr.contains("max_lagg"), "{stderr}");
    assert!(!Path::new(data).exists(), "refused before the data dir was made");
}

#[test]
fn a_witness_with_data_or_as_the_primary_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("w").display().to_string();
    let witness = |extra: &[&str]| {
        let mut args = vec![
            "node",
            "--witness",
            "--id",
            "1",
            "--region",
            "judge",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            &data,
            "--known-region",
            "east=127.0.0.1:2",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (code, _, err) = witness(&["--primary-region", "east", "--initial-cluster", "1=127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("initial-cluster") && err.contains("a witness is a one-node region"),
        "{err}"
    );
    let (code, _, err) = witness(&["--primary-region", "judge"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("regions.primary") && err.contains("witness"), "{err}");
}

#[test]
fn drill_list_names_every_scenario_and_an_unknown_subcommand_exits_2() {
    let (code, out, err) = run(&["drill", "list"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names.len(), 15, "{out}");
    assert!(
        names.contains(&"postgres-primary-kill") && names.contains(&"leader-kill"),
        "{out}"
    );
    let (code, out, err) = run(&["--output", "json", "drill", "list"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<rampart_core::drill::ScenarioInfo> = serde_json::from_str(&out).expect("json");
    assert_eq!(listed, rampart_core::drill::catalogue());
    let (code, _, err) = run(&["drill", "explode"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_drill_reports_rto_and_rpo_and_exits_1_when_a_budget_cannot_be_met() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reports = dir.path().join("reports");
    let reports_text = reports.display().to_string();
    // An RTO budget of 1 ms no failover meets: exit 1, and the report says why.
    let (code, out, err) = run(&[
        "--output",
        "json",
        "drill",
        "run",
        "leader-kill",
        "--rto-budget",
        "1ms",
        "--report-dir",
        &reports_text,
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("a budget was missed"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json report");
    let step = &report["steps"][0];
    assert_eq!(step["scenario"], "leader-kill");
    assert!(step["rto_ms"].as_u64().expect("recovered") > 1, "{step}");
    assert_eq!(step["lost"], 0, "{step}");
    assert_eq!(step["within_budget"], false);
    assert!(
        step["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .all(|c| c["passed"] == true),
        "{step}"
    );
    assert_eq!(report["passed"], false);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("report.json")).expect("report.json")).expect("json");
    assert_eq!(written, report);
    let markdown = std::fs::read_to_string(reports.join("report.md")).expect("report.md");
    assert!(markdown.contains("| leader-kill |"), "{markdown}");
    // Scenarios that cannot run together, or an unknown one, are refused before anything
    // starts: exit 2.
    let (code, _, err) = run(&["drill", "run", "postgres-primary-kill", "region-failover"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("as two drills"), "{err}");
    let (code, _, err) = run(&["drill", "run", "zone-lost"]);
    assert_eq!(code, 2, "{err}");
    // A plan that cannot run is refused naming the field, before anything starts.
    let plan = dir.path().join("plan.toml");
    let refused = |text: &str| {
        std::fs::write(&plan, text).expect("write the plan");
        let (code, _, err) = run(&["drill", "run", "--plan", &plan.display().to_string()]);
        assert_eq!(code, 2, "{err}");
        err
    };
    let err =
        refused("[drill]\n[[drill.steps]]\nscenario = \"leader-kill\"\n[[drill.steps]]\nscenario = \"leader-kil\"\n");
    assert!(
        err.contains("drill.steps[1].scenario") && err.contains("unknown scenario"),
        "{err}"
    );
    let err = refused("[drill]\n[[drill.steps]]\nscenario = \"leader-kill\"\nsettle = \"soon\"\n");
    assert!(err.contains("drill.steps[0].settle"), "{err}");
    let err = refused("[drill]\nrto = \"5s\"\n[[drill.steps]]\nscenario = \"leader-kill\"\n");
    assert!(err.contains("rto"), "{err}");
    let err = refused("[drill]\n");
    assert!(err.contains("drill.steps"), "{err}");
    let err = refused("[drill]\n[[drill.steps]]\nscenario = \"failback\"\n");
    assert!(err.contains("needs region-failover or region-outage"), "{err}");
    std::fs::write(dir.path().join("bad.toml"), "[[regions]]\nname = \"east\"\nnodes = 9\n").expect("write");
    let err = refused("[drill]\ntopology = \"bad.toml\"\n[[drill.steps]]\nscenario = \"leader-kill\"\n");
    assert!(err.contains("regions[0].nodes"), "{err}");
}
