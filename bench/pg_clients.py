"""PostgreSQL clients shared by bench/patroni_failover.py and bench/rampart_pg_failover.py:
one statement through a router (HAProxy or Rampart's proxy), and writers inserting unique
ids through it while keeping the ones acknowledged, and counting them afterwards.
"""

import threading
import time

import psycopg2


def connect(port, password, timeout=1):
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                            dbname="postgres", connect_timeout=timeout)
    conn.autocommit = True
    return conn


def run_once(port, password, statement, args=None):
    """Runs one statement through the router at `port`; true when it was acknowledged."""
    try:
        conn = connect(port, password)
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = 1000")
            cur.execute(statement, args)
        conn.close()
        return True
    except Exception:
        return False


class Writers:
    """Clients inserting unique ids into `table` through the router at `port`, keeping the
    acknowledged ones. Daemon threads: a benchmark that fails does not wait for them."""

    def __init__(self, port, password, table, clients=4):
        self.port, self.password, self.table = port, password, table
        self.stop = False
        self.acknowledged = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(c,), daemon=True) for c in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, client):
        next_id, conn = client * 10_000_000, None
        while not self.stop:
            try:
                if conn is None:
                    conn = connect(self.port, self.password)
                with conn.cursor() as cur:
                    cur.execute("SET statement_timeout = 5000")
                    cur.execute(f"INSERT INTO {self.table} VALUES (%s)", (next_id,))
                with self.lock:
                    self.acknowledged.append(next_id)
            except Exception:
                conn = None
                time.sleep(0.02)
            next_id += 1

    def finish(self):
        self.stop = True
        for t in self.threads:
            t.join()
        return self.acknowledged


def lost(port, password, table, acknowledged):
    """How many of the acknowledged ids the instance at `port` lacks."""
    conn = connect(port, password, timeout=2)
    with conn.cursor() as cur:
        cur.execute(f"SELECT v FROM {table}")
        rows = {r[0] for r in cur.fetchall()}
    conn.close()
    return sum(1 for v in acknowledged if v not in rows)
