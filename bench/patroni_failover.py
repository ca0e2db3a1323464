"""Patroni's side of bench/patroni-vs-rampart: a 3-member Patroni 3 cluster of PostgreSQL
on loopback (etcd as its DCS, Patroni's default timings; synchronous_mode with
PATRONI_SYNC=1), HAProxy in
front with Patroni's documented health check (OPTIONS /primary on the REST port, inter 3s
fall 3 rise 2, on-marked-down shutdown-sessions); SIGKILL of the primary's node (its
Patroni and its PostgreSQL), time to the first INSERT a new primary accepts through
HAProxy. Meanwhile clients insert unique ids through HAProxy; at the end every
acknowledged id is looked for on the final primary (lost rows counted).

Run by bench/patroni-vs-rampart as root; Patroni and PostgreSQL run as user postgres.
Prints one JSON line: {"rounds_ms": [...], "acknowledged": N, "lost": N}. Every process it
starts is stopped by PID.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg2

import pg_clients

PG_BIN = "/usr/lib/postgresql/15/bin"
MEMBERS = 3
PG_PORT = 25432
API_PORT = 28008
ETCD_CLIENT, ETCD_PEER = 22379, 22380
HAPROXY_PORT = 25500
# PATRONI_SYNC=1: synchronous_mode on (in this harness it did not fail over within the
# deadline after the second kill, 2 runs of 2: see docs/BENCHMARKS.md).
SYNCHRONOUS = os.environ.get("PATRONI_SYNC") == "1"
DEADLINE = int(os.environ.get("PATRONI_BENCH_DEADLINE", "180"))


def eventually(what, check, timeout=DEADLINE, every=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(every)
    print(f"members: {members()}", file=sys.stderr)
    raise SystemExit(f"timed out waiting for {what}")


def config(root, i):
    data = os.path.join(root, f"pg{i}")
    return f"""scope: bench
name: pg{i}
restapi:
  listen: 127.0.0.1:{API_PORT + i}
  connect_address: 127.0.0.1:{API_PORT + i}
etcd:
  host: 127.0.0.1:{ETCD_CLIENT}
bootstrap:
  dcs:
    synchronous_mode: {"true" if SYNCHRONOUS else "false"}
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{PG_PORT + i}
  connect_address: 127.0.0.1:{PG_PORT + i}
  data_dir: {data}
  bin_dir: {PG_BIN}
  remove_data_directory_on_rewind_failure: true
  remove_data_directory_on_diverged_timelines: true
  authentication:
    superuser: {{username: postgres, password: postgres}}
    replication: {{username: replicator, password: replicator}}
    rewind: {{username: postgres, password: postgres}}
  parameters:
    unix_socket_directories: {root}
    shared_buffers: 16MB
"""


def members():
    for i in range(MEMBERS):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT + i}/cluster", timeout=1) as r:
                return json.load(r)["members"]
        except Exception:
            continue
    return []


def leader_index():
    for m in members():
        if m["role"] == "leader" and m["state"] == "running":
            return int(m["name"][2:])
    return None


def all_streaming():
    """Every member up, and every replica on the leader's timeline and caught up (a
    replica still to be rewound is not ready to take over)."""
    ms = members()
    leaders = [m for m in ms if m["role"] == "leader" and m["state"] == "running"]
    if len(ms) != MEMBERS or len(leaders) != 1:
        return False
    timeline = leaders[0].get("timeline")
    replicas = [m for m in ms if m["role"] in ("replica", "sync_standby") and m["state"] in ("streaming", "running")
                and m.get("timeline") == timeline and (m.get("lag") or 0) < 1 << 20]
    return len(replicas) == MEMBERS - 1


def sql(i, statement):
    """Runs one statement on member i; true when it succeeded."""
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=PG_PORT + i, user="postgres",
                                password="postgres", dbname="postgres", connect_timeout=1)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = 1000")
            cur.execute(statement)
        conn.close()
        return True
    except Exception:
        return False


def write(i):
    return sql(i, "INSERT INTO bench (at) VALUES (now())")


def haproxy_config(root):
    servers = "\n".join(
        f"    server pg{i} 127.0.0.1:{PG_PORT + i} maxconn 100 check port {API_PORT + i}" for i in range(MEMBERS))
    return f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 4s
    timeout client 30m
    timeout server 30m
    timeout check 5s
listen primary
    bind 127.0.0.1:{HAPROXY_PORT}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
{servers}
"""


def through_haproxy(statement, args=None):
    return pg_clients.run_once(HAPROXY_PORT, "postgres", statement, args)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    root = tempfile.mkdtemp(prefix="patroni-bench-")
    shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    procs = {}

    def start_member(i):
        path = os.path.join(root, f"pg{i}.yml")
        with open(path, "w") as f:
            f.write(config(root, i))
        shutil.chown(path, "postgres", "postgres")
        log = open(os.path.join(root, f"pg{i}.log"), "a")
        procs[i] = subprocess.Popen(["runuser", "-u", "postgres", "--", "patroni", path],
                                    stdout=log, stderr=subprocess.STDOUT)

    etcd_dir = os.path.join(root, "etcd")
    etcd = subprocess.Popen(
        ["etcd", "--name", "e", "--data-dir", etcd_dir, "--enable-v2=true",
         "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
         "--advertise-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
         "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
         "--initial-cluster", f"e=http://127.0.0.1:{ETCD_PEER}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    haproxy_path = os.path.join(root, "haproxy.cfg")
    with open(haproxy_path, "w") as f:
        f.write(haproxy_config(root))
    haproxy = None
    try:
        haproxy = subprocess.Popen(["haproxy", "-f", haproxy_path, "-db"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(MEMBERS):
            start_member(i)
            if i == 0:
                eventually("the first primary", lambda: leader_index() == 0)
        eventually("every replica streaming", all_streaming)
        first = leader_index()
        eventually("the bench table", lambda: sql(first, "CREATE TABLE IF NOT EXISTS bench (at timestamptz)"))
        eventually("the ids table", lambda: sql(first, "CREATE TABLE IF NOT EXISTS ids (v bigint PRIMARY KEY)"))
        for i in range(MEMBERS):
            eventually(f"the bench table on pg{i}", lambda: sql(i, "SELECT 1 FROM bench LIMIT 1"))
        eventually("a write through HAProxy", lambda: through_haproxy("SELECT 1"))
        writers = pg_clients.Writers(HAPROXY_PORT, "postgres", "ids")
        rounds_ms = []
        for _ in range(rounds):
            eventually("every replica streaming", all_streaming)
            old = leader_index()
            eventually("a write on the primary", lambda: write(old))
            postmaster = int(open(os.path.join(root, f"pg{old}", "postmaster.pid")).readline())
            # The primary's node dies: its Patroni and its PostgreSQL at once.
            victims = [procs[old].pid] + child_pids(procs[old].pid) + [postmaster]
            killed = time.monotonic()
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # The old primary died with its node: a write through HAProxy that succeeds is
            # on a new one.
            eventually("a write on a new primary", lambda: through_haproxy("INSERT INTO bench (at) VALUES (now())"),
                       timeout=DEADLINE, every=0.05)
            rounds_ms.append(round((time.monotonic() - killed) * 1000))
            procs[old].wait()
            start_member(old)
        eventually("every replica streaming", all_streaming)
        acknowledged = writers.finish()
        lost = pg_clients.lost(PG_PORT + leader_index(), "postgres", "ids", acknowledged)
        print(json.dumps({"rounds_ms": rounds_ms, "acknowledged": len(acknowledged), "lost": lost,
                          "synchronous": SYNCHRONOUS}))
    finally:
        if haproxy:
            haproxy.kill()
            haproxy.wait()
        for p in procs.values():
            for pid in child_pids(p.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        # PostgreSQL servers left without their Patroni.
        for i in range(MEMBERS):
            try:
                pid = int(open(os.path.join(root, f"pg{i}", "postmaster.pid")).readline())
                os.kill(pid, signal.SIGQUIT)
            except (OSError, ValueError):
                pass
        etcd.terminate()
        etcd.wait(timeout=30)
        if os.environ.get("KEEP_PATRONI_BENCH"):
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def child_pids(pid):
    """Every descendant of pid (the patroni process under runuser, and what it runs)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found.extend(kids)
        frontier.extend(kids)
    return found


if __name__ == "__main__":
    main()
