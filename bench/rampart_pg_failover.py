"""Rampart's side of bench/patroni-vs-rampart: a 3-node region running a `kind = "postgres"`
service of 3 PostgreSQL instances (one per node), Rampart's proxy in front; SIGKILL of the
node that hosts the primary (its PostgreSQL goes with it), time to the first INSERT a new
primary accepts through the proxy. Meanwhile clients insert unique ids through the proxy;
at the end every acknowledged id is looked for on the final primary (lost rows counted).

Usage: rampart_pg_failover.py BINARY ROUNDS LABEL POLICY_JSON
Prints one JSON line: {"label": ..., "rounds_ms": [...], "acknowledged": N, "lost": N}.
Every process it starts is stopped by PID.
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

import pg_clients

PG_BIN = "/usr/lib/postgresql/15/bin"
NODES = 3
BASE = int(os.environ.get("RAMPART_PG_BENCH_PORT", "27400"))
NODE_PORT = BASE          # nodes: BASE+1..3
PG_PORT = BASE + 10       # instances: BASE+11..13
PROXY_PORT = BASE + 20
DEADLINE = 120
PASSWORD = "bench"


def eventually(what, check, timeout=DEADLINE, every=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def api(method, path, body=None):
    for i in range(1, NODES + 1):
        try:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(f"http://127.0.0.1:{NODE_PORT + i}{path}", data=data, method=method,
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=2) as answer:
                return json.load(answer)
        except Exception:
            continue
    return None


def through_proxy(statement, args=None):
    return pg_clients.run_once(PROXY_PORT, PASSWORD, statement, args)


def try_lost(acknowledged):
    """How many acknowledged ids the primary lacks (as a list, so that 0 counts as done)."""
    try:
        return [pg_clients.lost(PROXY_PORT, PASSWORD, "t", acknowledged)]
    except Exception:
        return None


def writable_instance():
    """The id of the one instance out of recovery, if exactly one is."""
    found = []
    for i in range(1, NODES + 1):
        try:
            conn = pg_clients.connect(PG_PORT + i, PASSWORD)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                if not cur.fetchone()[0]:
                    found.append(f"pg-{i}")
            conn.close()
        except Exception:
            pass
    return found[0] if len(found) == 1 else None


def serving():
    """The primary's id once every instance serves and a replica may be promoted (in
    synchronous mode, only the synchronous standby may)."""
    view = api("GET", "/v1/services/db")
    report = api("GET", "/v1/services/db/eligibility")
    if not view or not report or not view.get("primary"):
        return None
    primary = view["primary"]
    if len(view.get("serving", [])) != NODES:
        return None
    if not any(e["rank"] for e in report["instances"] if e["id"] != primary):
        return None
    return primary


def main():
    binary, rounds, label, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    root = tempfile.mkdtemp(prefix="rampart-pg-bench-")
    os.chmod(root, 0o755)
    with open(os.path.join(root, "pw"), "w") as f:
        f.write(PASSWORD + "\n")
    nodes, proxy = {}, None
    initial = ",".join(f"{i}=127.0.0.1:{NODE_PORT + i}" for i in range(1, NODES + 1))

    def start_node(i):
        data = os.path.join(root, f"n{i}")
        os.makedirs(data, exist_ok=True)
        log = open(os.path.join(data, "node.log"), "a")
        nodes[i] = subprocess.Popen(
            [binary, "node", "--id", str(i), "--listen", f"127.0.0.1:{NODE_PORT + i}", "--data-dir", data,
             "--initial-cluster", initial], stdout=log, stderr=subprocess.STDOUT)

    try:
        for i in range(1, NODES + 1):
            start_node(i)
        eventually("a leader", lambda: (api("GET", "/v1/cluster") or {}).get("leader"))
        policy = dict(policy)
        policy["kind"] = "postgres"
        policy["postgres"] = dict(policy.get("postgres", {}), **{
            "bin_dir": PG_BIN,
            "data_dir": os.path.join(root, "pg", "{instance}"),
            "superuser": {"password_file": os.path.join(root, "pw")},
            "replication_user": {"password_file": os.path.join(root, "pw")},
        })
        os.makedirs(os.path.join(root, "pg"), exist_ok=True)
        os.chmod(os.path.join(root, "pg"), 0o755)
        eventually("the service", lambda: api("PUT", "/v1/services/db", policy))
        for i in range(1, NODES + 1):
            body = {"endpoint": f"127.0.0.1:{PG_PORT + i}", "node": i}
            eventually(f"instance pg-{i}", lambda: api("PUT", f"/v1/services/db/instances/pg-{i}", body))
        with open(os.path.join(root, "proxy.toml"), "w") as f:
            f.write(f'[[proxy.listeners]]\nname = "db"\nbind = "127.0.0.1:{PROXY_PORT}"\n'
                    'service = "db"\nroute = "primary"\n')
        endpoints = ",".join(f"127.0.0.1:{NODE_PORT + i}" for i in range(1, NODES + 1))
        proxy = subprocess.Popen([binary, "proxy", "--config", os.path.join(root, "proxy.toml"),
                                  "--endpoints", endpoints],
                                 stdout=open(os.path.join(root, "proxy.log"), "a"), stderr=subprocess.STDOUT)
        eventually("the first primary", serving, timeout=180)
        eventually("the table", lambda: through_proxy("CREATE TABLE IF NOT EXISTS t (v bigint PRIMARY KEY)"))
        writers = pg_clients.Writers(PROXY_PORT, PASSWORD, "t")
        rounds_ms = []
        for _ in range(rounds):
            eventually("every instance serving", serving, timeout=180)
            # The primary as PostgreSQL itself says (the one out of recovery).
            old = eventually("the primary", writable_instance)
            eventually("a write through the proxy", lambda: through_proxy("SELECT 1"))
            node = int(old.split("-")[1])
            killed = time.monotonic()
            nodes[node].send_signal(signal.SIGKILL)
            # The old primary died with its node: a write that succeeds is on a new one.
            eventually("a write on a new primary",
                       lambda: through_proxy("INSERT INTO t VALUES (-1) ON CONFLICT DO NOTHING"), every=0.02)
            rounds_ms.append(round((time.monotonic() - killed) * 1000))
            nodes[node].wait()
            start_node(node)
        eventually("every instance serving", serving, timeout=180)
        acknowledged = writers.finish()
        # Counted on the primary the proxy routes to now.
        lost = eventually("the rows", lambda: try_lost(acknowledged))
        print(json.dumps({"label": label, "rounds_ms": rounds_ms, "acknowledged": len(acknowledged), "lost": lost[0]}))
    finally:
        if proxy:
            proxy.kill()
            proxy.wait()
        for p in nodes.values():
            p.send_signal(signal.SIGTERM)
        for p in nodes.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP_RAMPART_BENCH"):
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
