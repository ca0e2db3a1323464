//! Command-line surface: argument definitions and the thin glue from each command to
//! `rampart-client`, `rampart-node` or the demo.

use std::time::Duration;

use clap::{Parser, Subcommand};
use rampart_client::{Client, PutOptions};
use serde::Serialize;

use crate::node_cmd::NodeArgs;
use crate::outcome::{duration_arg, print, Failure, Output};

/// Rampart keeps services available through the loss of a process, a machine, a zone or a
/// region, and measures it.
#[derive(Parser, Debug)]
#[command(name = "rampart", version, propagate_version = true)]
pub struct Args {
    /// Nodes to talk to, comma-separated HOST:PORT
    #[arg(
        long,
        global = true,
        env = "RAMPART_ENDPOINTS",
        default_value = "127.0.0.1:7001",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// How read commands print their answer
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Overall deadline of one command, retries included
    #[arg(long, global = true, default_value = "10s", value_parser = duration_arg)]
    timeout: Duration,
    /// API token NAME.SECRET for a region with TLS (prefer --token-file: argv is visible to other users)
    #[arg(long, global = true, env = "RAMPART_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token, e.g. a node's data-dir/admin.token
    #[arg(long, global = true, env = "RAMPART_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// Cluster CA (ca.pem from `rampart certs init`): talk TLS and verify nodes against it
    #[arg(long, global = true, env = "RAMPART_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate to present (optional; tokens authenticate calls)
    #[arg(
        long = "cert",
        id = "client_cert",
        global = true,
        env = "RAMPART_CERT",
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    /// Key of --cert
    #[arg(
        long = "key",
        id = "client_key",
        global = true,
        env = "RAMPART_KEY",
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    /// A witness runs on one thread: it keeps no data and serves little.
    pub fn is_witness(&self) -> bool {
        matches!(&self.command, Command::Node(node) if node.witness)
    }
}

#[derive(Subcommand, Debug)]
enum RegionsCommand {
    /// Each standby region compares its shipped checksum with the primary's at the same
    /// revision, now (given a primary region's endpoints: every standby; a standby's: that
    /// one). Exits 1 if any differs or could not compare.
    Verify,
    /// Writes an old primary region held and never shipped, set aside when it resynced:
    /// the files on the answering node (and which node saved each), or with --export NAME
    /// one file's writes, one JSON object per line, to replay what you choose
    Divergence {
        /// A file's name, as listed
        #[arg(long)]
        export: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a region member (the daemon)
    Node(Box<NodeArgs>),
    /// Show the region: leader, term, revision and checksum (shipped and local), members
    Status,
    /// Every region: role, epoch, whether it answers, last contact, revision and checksum;
    /// `regions verify` compares each standby's state with the primary's now
    Regions {
        #[command(subcommand)]
        command: Option<RegionsCommand>,
    },
    /// Read and write keys
    #[command(subcommand)]
    Kv(KvCommand),
    /// Grant, keep alive and revoke leases
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Leader election with fencing tokens
    #[command(subcommand)]
    Elect(ElectCommand),
    /// List, add and remove region members
    #[command(subcommand)]
    Members(MembersCommand),
    /// Services Rampart keeps available: register, list, show, explain eligibility
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Planned, zero-loss role change: the primary steps down, the target catches up and is promoted
    Switchover {
        service: String,
        /// The instance to promote
        #[arg(long)]
        to: String,
    },
    /// Make another region the primary: planned (writes stop, it catches up, checksums are
    /// compared, the lease is handed over; nothing lost) when the primary region answers;
    /// otherwise refused unless --allow-data-loss, and --dry-run prints the plan and what it
    /// would lose first
    Failover {
        /// The region to make the primary
        #[arg(long)]
        to: String,
        /// The primary region does not answer: take over anyway, losing the writes it did
        /// not ship (stated before and in the failover event)
        #[arg(long)]
        allow_data_loss: bool,
        /// Print the plan and the data it would lose; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Planned failover back to a region (after it resynced as a standby); nothing lost
    Failback {
        /// The region to make the primary again
        #[arg(long)]
        to: String,
        /// Print the plan; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the proxy: the [[proxy.listeners]] of a TOML file, TCP or HTTP, over static
    /// upstreams or a service of the registry (asked of --endpoints); see docs/guide.md, "Proxy"
    Proxy {
        /// TOML file with [[proxy.listeners]] tables
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// A small replicated key-value service for trying failover: writes only on the
    /// primary, replicas pull its log and report their lag in heartbeats
    SampleService {
        /// Address to serve on, e.g. 127.0.0.1:8081
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The service it belongs to (registered with a heartbeat check)
        #[arg(long)]
        service: String,
        /// Its instance id in that service
        #[arg(long)]
        instance: String,
        /// How often it heartbeats (writes stop 3 missed heartbeats after losing Rampart)
        #[arg(long, default_value = "200ms", value_parser = duration_arg)]
        heartbeat: Duration,
        /// Acknowledge a write only once a replica Rampart would promote has it (one
        /// registered synchronous, in a policy with synchronous = true); else 503 after 5s
        #[arg(long)]
        synchronous: bool,
    },
    /// Create API tokens, list and revoke them (admin role)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Certificates for TLS: a cluster CA, node and client certificates
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Backups of the region: take one, list, verify by restoring, restore into a new region
    #[command(subcommand)]
    Backup(crate::backup_cmd::BackupCommand),
    /// The region's event log, oldest first: audit trail of operator and admin actions, ...
    Events {
        /// Only events of this kind, e.g. audit
        #[arg(long)]
        kind: Option<String>,
        /// At most this many of the newest
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Disaster-recovery drills: `drill list` names the scenarios, `drill run` runs them
    /// against a local region and reports RTO, RPO and the safety checks
    #[command(subcommand)]
    Drill(crate::drill_cmd::DrillCommand),
    /// Start a 3-node region locally, kill its leader under load, and report what happened
    Demo(crate::demo::DemoArgs),
    /// Measure put throughput and latency, failover time, stability and memory on a local region
    Bench(BenchArgs),
}

#[derive(Subcommand, Debug)]
enum KvCommand {
    /// Print a key's value (or every key under --prefix)
    Get {
        key: Option<String>,
        /// List every key starting with this prefix instead
        #[arg(long)]
        prefix: Option<String>,
        /// Serve from the answering node without confirming leadership (may be stale)
        #[arg(long)]
        stale: bool,
    },
    /// Write a key
    Put {
        key: String,
        value: String,
        /// Attach to a lease: the key is deleted when the lease ends
        #[arg(long)]
        lease: Option<u64>,
        /// Only write if the key is at this revision (0 = must not exist)
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Delete a key
    Del { key: String },
    /// Print changes under a prefix as they happen (Ctrl-C to stop)
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision instead of now
        #[arg(long)]
        from_revision: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Grant a lease with a TTL such as 10s
    Grant {
        #[arg(value_parser = duration_arg)]
        ttl: Duration,
    },
    /// Keep a lease alive (once, or every third of its TTL until Ctrl-C)
    Keepalive {
        id: u64,
        #[arg(long)]
        once: bool,
    },
    /// Revoke a lease: its keys are deleted and its elections freed
    Revoke { id: u64 },
}

#[derive(Subcommand, Debug)]
enum ElectCommand {
    /// Campaign for an election, holding a lease; prints the fencing token on winning
    Campaign {
        name: String,
        candidate: String,
        #[arg(long)]
        lease: u64,
        /// Wait this long for the election to become free
        #[arg(long, value_parser = duration_arg)]
        wait: Option<Duration>,
    },
    /// Show the current holder and token
    Observe { name: String },
    /// Give up an election
    Resign {
        name: String,
        /// Only resign if this candidate holds it
        #[arg(long)]
        candidate: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum MembersCommand {
    /// List members
    List,
    /// Add a started node (without --initial-cluster) as a voter
    Add { id: u64, addr: String },
    /// Remove a member
    Remove { id: u64 },
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// List services with their primary
    List,
    /// Show a service: policy, primary, fencing token, instances with role and health
    Show { name: String },
    /// Register a service (--policy FILE, TOML or JSON) and/or one of its instances
    /// (--instance ID --endpoint HOST:PORT ...)
    Register {
        name: String,
        /// The service policy, as in DESIGN.md's `[services.NAME]` table (TOML or JSON)
        #[arg(long)]
        policy: Option<std::path::PathBuf>,
        /// Register (or update) this instance
        #[arg(long, requires = "endpoint")]
        instance: Option<String>,
        /// Where the instance serves, HOST:PORT
        #[arg(long, requires = "instance")]
        endpoint: Option<String>,
        /// Higher is preferred for promotion; 0 = never automatically [default: 100]
        #[arg(long)]
        priority: Option<u32>,
        /// The node that runs the instance's hooks
        #[arg(long)]
        node: Option<u64>,
        #[arg(long)]
        zone: Option<String>,
        /// Region of the instance [default: the answering node's]
        #[arg(long)]
        region: Option<String>,
        /// This instance is the synchronous standby
        #[arg(long)]
        synchronous: bool,
    },
    /// For every instance: could it be promoted now, and if not, every reason
    Eligibility { name: String },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token; its secret is printed once and stored only hashed
    Create {
        name: String,
        /// read (reads, watches), write (+ KV, leases, elections), operator (+ members,
        /// switchover, backups) or admin (+ tokens)
        #[arg(long)]
        role: String,
        /// Restrict to keys under this prefix (repeatable)
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
    },
    /// List tokens (names, roles, prefixes; never secrets)
    List,
    /// Revoke a token on every node
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a cluster CA (or reuse the one in DIR), node certificates and a client
    /// certificate; run again with the same DIR to rotate node and client certificates
    Init {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Nodes to certify: ids, optionally with the host each is reached by, e.g.
        /// 1,2,3 or 1=10.0.0.5,2=db2.example
        #[arg(long)]
        nodes: String,
        /// Extra names or addresses every node certificate is valid for (loopback and
        /// localhost always are)
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Concurrent clients of each put round
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Length of each put round
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    duration: Duration,
    /// Failover rounds (SIGKILL the leader, time to the first acknowledged write)
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
    /// Length of the 64-client load during which the Raft term must not change
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    stability: Duration,
    /// Keys of 100 bytes loaded before measuring resident memory
    #[arg(long, default_value_t = 100_000)]
    memory_keys: usize,
    /// Extra flags for every node, e.g. "--heartbeat-interval=100ms --election-timeout=1s"
    #[arg(long, allow_hyphen_values = true)]
    node_args: Option<String>,
    /// Instead of the suite: what TLS and tokens cost, a plaintext and a TLS region measured
    /// alternately in the same run (with --clients, --duration and --rounds)
    #[arg(long)]
    security: bool,
    /// Rounds of the --security comparison; the median round is reported
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead of the suite: SIGKILL a sample service's primary process and time until
    /// another instance takes a write, at default and tuned check settings (--rounds each)
    #[arg(long)]
    service_failover: bool,
    /// With --service-failover: kill the primary `instance`, or the `node` hosting it (and
    /// so its instance, as Patroni's failover is usually measured)
    #[arg(long, value_enum, default_value = "instance")]
    kill: crate::bench_service::Kill,
    /// Instead of the suite: each node's CPU while the region checks this many instances
    /// with 1 s HTTP checks (and while idle, for comparison)
    #[arg(long)]
    check_cost: Option<usize>,
}

async fn run_bench(args: BenchArgs, output: Output) -> Result<(), Failure> {
    use rampart_testkit::bench::{rampart_suite, report_markdown, SuiteOptions};
    let binary = std::env::current_exe().map_err(|e| Failure::failed(e.into()))?;
    if args.clients.is_empty() || args.clients.contains(&0) {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid --clients: expected whole numbers from 1, e.g. 1,16,64"
        )));
    }
    let node_args: Vec<String> = args
        .node_args
        .as_deref()
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(instances) = args.check_cost {
        eprintln!("measuring the CPU cost of checking {instances} instances...");
        let cost = crate::bench_service::check_cost(&binary, instances, args.duration.as_secs().max(5)).await?;
        print(output, &cost, |c| {
            format!(
                "{} instances, 1 s HTTP checks, {} s per sample\nCPU % of one core per node: {:?} (idle region: {:?})",
                c.instances,
                c.seconds,
                c.cpu_percent.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>(),
                c.idle_cpu_percent.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>()
            )
        });
        return Ok(());
    }
    if args.service_failover {
        eprintln!("benchmarking service failover with supervised sample services...");
        let mut results = Vec::new();
        for (interval, timeout, fall) in [("1s", "500ms", 3), ("200ms", "100ms", 2)] {
            results
                .push(crate::bench_service::measure(&binary, interval, timeout, fall, args.rounds, args.kill).await?);
        }
        print(output, &results, |r| crate::bench_service::markdown(r));
        return Ok(());
    }
    if args.security {
        use rampart_testkit::bench::{security_cost, security_markdown};
        eprintln!("benchmarking plaintext against TLS with tokens on two local 3-node regions...");
        let costs = security_cost(&binary, &args.clients, args.duration, args.rounds, &node_args)
            .await
            .map_err(|e| Failure::failed(e.into()))?;
        print(output, &costs, |c| security_markdown(c));
        return Ok(());
    }
    let options = SuiteOptions {
        clients: args.clients,
        duration: args.duration,
        failover_rounds: args.failover_rounds,
        stability: args.stability,
        memory_keys: args.memory_keys,
        node_args,
        ..SuiteOptions::default()
    };
    eprintln!("benchmarking a local 3-node region (fsync on); this takes a few minutes...");
    let report = rampart_suite(&binary, &options)
        .await
        .map_err(|e| Failure::failed(e.into()))?;
    print(output, &report, report_markdown);
    Ok(())
}

/// Reads and validates a proxy config file; any fault is a usage error (exit 2) naming the
/// field, its value and what is allowed.
#[allow(clippy::type_complexity)]
fn proxy_listeners(
    path: &std::path::Path,
) -> Result<(Vec<rampart_core::proxy::Listener>, Option<std::net::SocketAddr>), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read --config {}: {e}", path.display())))?;
    let file: rampart_core::proxy::ProxyFile = toml::from_str(&text)
        .map_err(|e| Failure::usage(anyhow::anyhow!("invalid --config {}: {e}", path.display())))?;
    let bad = |e: rampart_core::service::FieldError| Failure::usage(anyhow::anyhow!("{e} (in {})", path.display()));
    Ok((file.proxy.validate().map_err(bad)?, file.proxy.admin().map_err(bad)?))
}

/// The token from --token or --token-file, if any.
fn token(args: &Args) -> Result<Option<String>, Failure> {
    match (&args.token, &args.token_file) {
        (Some(token), _) => Ok(Some(token.trim().to_string())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read --token-file {}: {e}", path.display()))),
        (None, None) => Ok(None),
    }
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let output = args.output;
    let tls = args.cacert.clone().map(|ca| rampart_client::TlsOptions {
        ca,
        cert: args.client_cert.clone(),
        key: args.client_key.clone(),
    });
    let token = token(&args)?;
    let client = || -> Result<Client, Failure> {
        Ok(Client::secured(&args.endpoints, tls.as_ref(), token.as_deref())?.with_deadline(args.timeout))
    };
    match args.command {
        Command::Node(node_args) => crate::node_cmd::run(*node_args).await,
        Command::Demo(demo_args) => crate::demo::run(demo_args).await,
        Command::Drill(command) => {
            // What `drill run --endpoints` drills: the deployment the global flags reach,
            // when `--endpoints` is on the command line (the variable alone does not turn
            // a local drill into one of a deployment).
            let given = std::env::args().any(|a| a == "--endpoints" || a.starts_with("--endpoints="));
            let access = given.then(|| rampart_testkit::drill::remote::Access {
                endpoints: args.endpoints.clone(),
                token: token.clone(),
                tls: tls.clone(),
            });
            crate::drill_cmd::run(output, command, access).await
        }
        Command::Bench(bench_args) => run_bench(bench_args, output).await,
        Command::Status => {
            let status = client()?.cluster().await?;
            print(output, &status, |s| {
                let mut text = format!(
                    "region {}  leader {}  term {}  revision {}  checksum {}  local revision {}  local checksum {}  security {}\n",
                    s.region,
                    s.leader.map_or("none".to_string(), |l| l.to_string()),
                    s.term,
                    s.revision,
                    s.checksum,
                    s.local_revision,
                    s.local_checksum,
                    s.security
                );
                for m in &s.members {
                    text.push_str(&format!("  node {} {} {}\n", m.id, m.addr, m.role));
                }
                text.trim_end().to_string()
            });
            Ok(())
        }
        Command::Regions {
            command: Some(RegionsCommand::Verify),
        } => {
            let answer = client()?.regions_verify().await?;
            print(output, &answer, |a| {
                let lines: Vec<String> = a
                    .verifications
                    .iter()
                    .map(|v| match (&v.error, v.matched, v.revision) {
                        (Some(error), _, _) => format!("{}: not verified: {error}", v.region),
                        (None, Some(true), Some(revision)) => format!(
                            "{}: equal to the primary at revision {revision} (checksum {})",
                            v.region,
                            v.standby_checksum.as_deref().unwrap_or("-")
                        ),
                        (None, _, revision) => format!(
                            "{}: DIFFERS from the primary at revision {}: standby {}, primary {}: its reads are suspect",
                            v.region,
                            revision.unwrap_or(0),
                            v.standby_checksum.as_deref().unwrap_or("-"),
                            v.primary_checksum.as_deref().unwrap_or("-")
                        ),
                    })
                    .collect();
                if lines.is_empty() {
                    "no standby region to verify".to_string()
                } else {
                    lines.join("\n")
                }
            });
            let all_equal = answer.verifications.iter().all(|v| v.matched == Some(true));
            if !all_equal {
                return Err(Failure::failed(anyhow::anyhow!(
                    "not every standby region is verified equal to the primary"
                )));
            }
            Ok(())
        }
        Command::Failover {
            to,
            allow_data_loss,
            dry_run,
        } => {
            let request = rampart_core::api::FailoverRequest {
                to,
                allow_data_loss,
                dry_run,
            };
            let answer = client()?.regions_failover(&request).await?;
            print(output, &answer, describe_failover);
            Ok(())
        }
        Command::Failback { to, dry_run } => {
            let request = rampart_core::api::FailoverRequest {
                to,
                allow_data_loss: false,
                dry_run,
            };
            let answer = client()?.regions_failback(&request).await?;
            print(output, &answer, describe_failover);
            Ok(())
        }
        Command::Regions {
            command: Some(RegionsCommand::Divergence { export: Some(name) }),
        } => {
            let answer = client()?.regions_divergence_export(&name).await?;
            let writes = answer["writes"].as_array().cloned().unwrap_or_default();
            for write in writes {
                println!("{write}");
            }
            Ok(())
        }
        Command::Regions {
            command: Some(RegionsCommand::Divergence { export: None }),
        } => {
            let answer = client()?.regions_divergence().await?;
            print(output, &answer, |a| {
                let mut lines: Vec<String> = a
                    .files
                    .iter()
                    .map(|f| {
                        format!(
                            "{}  node {}  epoch {}  revisions {} to {}  {} writes",
                            f.name, f.node_id, f.epoch, f.from_revision, f.to_revision, f.writes
                        )
                    })
                    .collect();
                if lines.is_empty() {
                    lines.push("no divergence file on this node".to_string());
                }
                for event in &a.events {
                    lines.push(format!("event: {}", event.detail));
                }
                lines.join("\n")
            });
            Ok(())
        }
        Command::Regions { command: None } => {
            let answer = client()?.regions().await?;
            print(output, &answer, |a| {
                let mut text = format!("seen from region {} (primary {})\n", a.region, a.primary);
                text.push_str("  REGION  ROLE  EPOCH  REACHABLE  LAST CONTACT  REVISION  CHECKSUM\n");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                for r in &a.regions {
                    let contact = match r.last_contact_ms {
                        _ if r.this_region => "this region".to_string(),
                        Some(ms) => format!("{}ms ago", now.saturating_sub(ms)),
                        None => "never".to_string(),
                    };
                    let unknown = || "-".to_string();
                    text.push_str(&format!(
                        "  {}  {}  {}  {}  {}  {}  {}\n",
                        r.name,
                        r.role,
                        r.epoch,
                        if r.reachable { "yes" } else { "no" },
                        contact,
                        r.revision.map_or_else(unknown, |v| v.to_string()),
                        r.checksum.clone().unwrap_or_else(unknown),
                    ));
                }
                text.trim_end().to_string()
            });
            Ok(())
        }
        Command::Kv(kv) => run_kv(client()?, output, kv).await,
        Command::Token(command) => run_token(client()?, output, command).await,
        Command::Backup(command) => crate::backup_cmd::run(client, output, command).await,
        Command::Service(command) => run_service(client()?, output, command).await,
        Command::Proxy { config } => {
            let (listeners, admin) = proxy_listeners(&config)?;
            let needs_control_plane = listeners.iter().any(|l| l.needs_control_plane().is_some());
            // A watch of the registry waits up to 10 s for a change; a node that does not
            // answer within 2 s more is left for the next endpoint.
            let registry = if needs_control_plane {
                Some(std::sync::Arc::new(client()?.with_deadline(Duration::from_secs(2))))
            } else {
                None
            };
            rampart_proxy::run(listeners, admin, registry)
                .await
                .map_err(|e| Failure::failed(anyhow::anyhow!("proxy: {e}")))
        }
        Command::SampleService {
            listen,
            service,
            instance,
            heartbeat,
            synchronous,
        } => {
            let endpoints = client()?.endpoints().to_vec();
            let options = rampart_node::sample::SampleOptions {
                listen,
                service,
                instance,
                endpoints,
                token: token.clone(),
                heartbeat,
                synchronous,
            };
            rampart_node::sample::run(options)
                .await
                .map_err(|e| Failure::failed(anyhow::anyhow!("sample service: {e}")))
        }
        Command::Switchover { service, to } => {
            // A switchover waits for hooks and catch-up: give it room beyond the default.
            let answer = client()?
                .with_deadline(args.timeout.max(Duration::from_secs(120)))
                .switchover(&service, &to)
                .await?;
            print(output, &answer, |a| {
                format!(
                    "{} is primary of {service} with token {} (was {}), in {}ms",
                    a.primary,
                    a.token,
                    a.previous.as_deref().unwrap_or("none"),
                    a.duration_ms
                )
            });
            Ok(())
        }
        Command::Certs(CertsCommand::Init { dir, nodes, hosts }) => {
            let nodes = rampart_node::certs::parse_nodes(&nodes).map_err(|e| Failure::usage(e.into()))?;
            if nodes.is_empty() {
                return Err(Failure::usage(anyhow::anyhow!(
                    "--nodes lists no node; e.g. --nodes 1,2,3"
                )));
            }
            let issued = rampart_node::certs::init(&dir, &nodes, &hosts).map_err(|e| Failure::failed(e.into()))?;
            let files: Vec<String> = issued.files.iter().map(|f| f.display().to_string()).collect();
            let answer = serde_json::json!({"dir": issued.dir, "reused_ca": issued.reused_ca, "files": files});
            print(output, &answer, |_| {
                let ca = if issued.reused_ca {
                    "kept the existing CA; issued new certificates"
                } else {
                    "created a cluster CA and certificates"
                };
                format!(
                    "{ca} in {}:\n  {}\nkeys are owner-only (0600); keep ca-key.pem off the nodes if you can",
                    issued.dir.display(),
                    files.join("\n  ")
                )
            });
            Ok(())
        }
        Command::Events { kind, limit } => {
            let answer = client()?.events(kind.as_deref(), Some(limit)).await?;
            print(output, &answer, |a| {
                a.events
                    .iter()
                    .map(|e| {
                        format!(
                            "#{} {} {} {} by {} from {}: {} {}",
                            e.id, e.at_ms, e.kind, e.action, e.actor, e.source, e.outcome, e.detail
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        Command::Lease(lease) => run_lease(client()?, output, lease).await,
        Command::Elect(elect) => run_elect(client()?, output, elect).await,
        Command::Members(members) => {
            let client = client()?;
            let answer = match members {
                MembersCommand::List => client.members().await?,
                MembersCommand::Add { id, addr } => client.add_member(id, &addr).await?,
                MembersCommand::Remove { id } => client.remove_member(id).await?,
            };
            print(output, &answer, |a| {
                a.members
                    .iter()
                    .map(|m| format!("{} {} {}", m.id, m.addr, m.role))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
    }
}

async fn run_kv(client: Client, output: Output, command: KvCommand) -> Result<(), Failure> {
    match command {
        KvCommand::Get { key, prefix, stale } => match (key, prefix) {
            (Some(key), None) => match client.get_key(&key, stale).await? {
                Some(kv) => {
                    print(output, &kv, |kv| kv.value.clone());
                    Ok(())
                }
                None => Err(Failure::failed(anyhow::anyhow!("key {key:?} not found"))),
            },
            (None, Some(prefix)) => {
                let range = client.range(&prefix, stale).await?;
                print(output, &range, |r| {
                    r.items
                        .iter()
                        .map(|kv| format!("{}={}", kv.key, kv.value))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                Ok(())
            }
            _ => Err(Failure::usage(anyhow::anyhow!("give either a KEY or --prefix PREFIX"))),
        },
        KvCommand::Put {
            key,
            value,
            lease,
            if_revision,
        } => {
            let answer = client.put(&key, &value, PutOptions { lease, if_revision }).await?;
            print(output, &answer, |a| format!("revision {}", a.revision));
            Ok(())
        }
        KvCommand::Del { key } => {
            let answer = client.delete(&key).await?;
            print(output, &answer, |a| {
                if a.deleted {
                    format!("deleted at revision {}", a.revision)
                } else {
                    "not found".into()
                }
            });
            Ok(())
        }
        KvCommand::Watch { prefix, from_revision } => {
            let mut watch = client.watch(&prefix, from_revision);
            while let Some(event) = watch.next().await {
                let event = event?;
                print(output, &event, |e| match &e.value {
                    Some(v) => format!("{} {} {}={}", e.revision, e.kind, e.key, v),
                    None => format!("{} {} {}", e.revision, e.kind, e.key),
                });
            }
            Ok(())
        }
    }
}

/// A value's name as the API spells it (`primary`, `up`).
fn label<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        other => format!("{other:?}"),
    }
}

/// Reads a service policy file: TOML (the `[services.NAME]` table's body) or JSON.
fn read_policy(path: &std::path::Path) -> Result<rampart_core::service::PolicySpec, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read --policy {}: {e}", path.display())))?;
    let parsed = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| Failure::usage(anyhow::anyhow!("invalid --policy {}: {e}", path.display())))
}

async fn run_service(client: Client, output: Output, command: ServiceCommand) -> Result<(), Failure> {
    match command {
        ServiceCommand::List => {
            let answer = client.services().await?;
            print(output, &answer, |a| {
                a.services
                    .iter()
                    .map(|s| {
                        format!(
                            "{} primary {} ({} instances)",
                            s.name,
                            s.primary.as_deref().unwrap_or("none"),
                            s.instances
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ServiceCommand::Show { name } => {
            let answer = client.service(&name).await?;
            print(output, &answer, |s| {
                let mut text = format!(
                    "{} primary {} token {}",
                    s.name,
                    s.primary.as_deref().unwrap_or("none"),
                    s.token
                );
                if let Some(pg) = s.kind.postgres() {
                    text.push_str(&format!(" postgres synchronous {}", label(&pg.synchronous)));
                    if pg.is_synchronous() {
                        let standby = s.synchronous_standby.as_deref().unwrap_or("none");
                        text.push_str(&format!(" standby {standby}"));
                    }
                }
                text.push('\n');
                for i in &s.instances {
                    text.push_str(&format!(
                        "  {} {} {} {} priority {} region {}",
                        i.id,
                        i.endpoint,
                        label(&i.role),
                        label(&i.health),
                        i.priority,
                        i.region
                    ));
                    if let Some(lag) = i.lag {
                        let unit = if s.kind.postgres().is_some() {
                            "bytes"
                        } else {
                            "revisions"
                        };
                        text.push_str(&format!(" lag {lag} {unit}"));
                    }
                    text.push('\n');
                }
                text.trim_end().to_string()
            });
        }
        ServiceCommand::Register {
            name,
            policy,
            instance,
            endpoint,
            priority,
            node,
            zone,
            region,
            synchronous,
        } => {
            if policy.is_none() && instance.is_none() {
                return Err(Failure::usage(anyhow::anyhow!(
                    "give --policy FILE to register the service, --instance ID --endpoint HOST:PORT to register an instance, or both"
                )));
            }
            let mut answer = serde_json::Map::new();
            if let Some(path) = policy {
                let stored = client.service_put(&name, &read_policy(&path)?).await?;
                answer.insert("service_created".into(), stored.created.into());
            }
            if let (Some(id), Some(endpoint)) = (instance, endpoint) {
                let spec = rampart_core::service::InstanceSpec {
                    endpoint,
                    region,
                    zone,
                    priority,
                    node,
                    synchronous: synchronous.then_some(true),
                    ..Default::default()
                };
                let stored = client.instance_put(&name, &id, &spec).await?;
                answer.insert("instance_created".into(), stored.created.into());
            }
            print(output, &answer, |_| format!("{name} registered"));
        }
        ServiceCommand::Eligibility { name } => {
            let answer = client.eligibility(&name).await?;
            print(output, &answer, |a| {
                a.instances
                    .iter()
                    .map(|e| {
                        let verdict = match e.rank {
                            Some(1) => "would be promoted".to_string(),
                            Some(rank) => format!("promotable, rank {rank}"),
                            None => "not promotable".to_string(),
                        };
                        let reasons: Vec<String> = e
                            .reasons
                            .iter()
                            .map(|r| serde_json::to_string(r).unwrap_or_default())
                            .collect();
                        format!("{} {verdict} {}", e.id, reasons.join(" "))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

async fn run_token(client: Client, output: Output, command: TokenCommand) -> Result<(), Failure> {
    match command {
        TokenCommand::Create { name, role, prefixes } => {
            let role = rampart_core::auth::Role::parse(&role)
                .map_err(|e| Failure::usage(anyhow::anyhow!("invalid --role: {e}")))?;
            let request = rampart_core::api::TokenCreateRequest { name, role, prefixes };
            let answer = client.token_create(&request).await?;
            // The secret is the point of this command: printed once, to stdout only.
            print(output, &answer, |a| a.token.clone());
        }
        TokenCommand::List => {
            let answer = client.tokens().await?;
            print(output, &answer, |a| {
                a.tokens
                    .iter()
                    .map(|t| {
                        let scope = if t.prefixes.is_empty() {
                            "all keys".to_string()
                        } else {
                            t.prefixes.join(",")
                        };
                        format!("{} {} {scope}", t.name, t.role)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        TokenCommand::Revoke { name } => {
            client.token_revoke(&name).await?;
            print(output, &serde_json::json!({"revoked": name}), |_| {
                format!("token {name} revoked")
            });
        }
    }
    Ok(())
}

async fn run_lease(client: Client, output: Output, command: LeaseCommand) -> Result<(), Failure> {
    match command {
        LeaseCommand::Grant { ttl } => {
            let answer = client.lease_grant(ttl).await?;
            print(output, &answer, |a| {
                format!("lease {} granted with ttl {}ms", a.id, a.ttl_ms)
            });
        }
        LeaseCommand::Keepalive { id, once } => loop {
            let answer = client.lease_keepalive(id).await?;
            print(output, &answer, |a| {
                format!("lease {id} kept alive, ttl {}ms", a.ttl_ms)
            });
            if once {
                break;
            }
            tokio::time::sleep(Duration::from_millis(answer.ttl_ms / 3)).await;
        },
        LeaseCommand::Revoke { id } => {
            client.lease_revoke(id).await?;
            print(output, &serde_json::json!({"revoked": id}), |_| {
                format!("lease {id} revoked")
            });
        }
    }
    Ok(())
}

async fn run_elect(client: Client, output: Output, command: ElectCommand) -> Result<(), Failure> {
    match command {
        ElectCommand::Campaign {
            name,
            candidate,
            lease,
            wait,
        } => {
            let answer = client.campaign(&name, &candidate, lease, wait).await?;
            print(output, &answer, |a| {
                format!("{} leads {name} with token {}", a.leader, a.token)
            });
        }
        ElectCommand::Observe { name } => match client.observe(&name).await? {
            Some(state) => print(output, &state, |s| {
                format!("{} leads {name} with token {} for {}ms", s.leader, s.token, s.since_ms)
            }),
            None => return Err(Failure::failed(anyhow::anyhow!("election {name:?} has no holder"))),
        },
        ElectCommand::Resign { name, candidate } => {
            let answer = client.resign(&name, candidate.as_deref()).await?;
            print(output, &answer, |a| {
                format!("{} resigned {name} (token {})", a.leader, a.token)
            });
        }
    }
    Ok(())
}

/// A region failover's answer, for people.
fn describe_failover(answer: &rampart_core::api::FailoverResponse) -> String {
    if answer.dry_run {
        return format!("dry run, nothing changed. {}", answer.plan);
    }
    let how = if answer.planned { "planned" } else { "forced" };
    let rpo = &answer.rpo;
    let lost = if answer.planned {
        "nothing lost (RPO 0)".to_string()
    } else {
        match rpo.reported_revision {
            Some(reported) => format!(
                "RPO: at least {} revisions (the old primary last reported revision {reported}), and any committed in its last {} ms",
                rpo.revisions, rpo.window_ms
            ),
            None => format!("RPO: unknown, any committed in the old primary's last {} ms", rpo.window_ms),
        }
    };
    format!(
        "{} is the primary region at epoch {} ({how} failover from {}, {} ms); {lost}",
        answer.to, answer.epoch, answer.from, answer.took_ms
    )
}
