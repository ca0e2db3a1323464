#!/usr/bin/env python3
"""One backend SIGKILLed under steady traffic through a proxy (bench/proxy-vs-haproxy).

Sends a GET every 10 ms on a kept connection (a new one after any failure) for
--seconds, SIGKILLs --kill-pid after the first second, and meanwhile polls the proxy's
status every 10 ms to see when the dead backend (--backend, HOST:PORT or a HAProxy server
name) leaves rotation. Prints one line: requests, failed requests, and how long after the
kill the backend was out of rotation.
"""

import argparse
import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from urllib.parse import urlsplit


def out_of_rotation(kind, url, backend):
    """Whether the status page says the backend is out of rotation."""
    with urllib.request.urlopen(url, timeout=1) as response:
        body = response.read().decode()
    if kind == "haproxy":
        # CSV: pxname,svname,...; field 17 (0-based) is status.
        header = body.splitlines()[0].lstrip("# ").split(",")
        status = header.index("status")
        for line in body.splitlines()[1:]:
            fields = line.split(",")
            if fields[0] == "web" and fields[1] == backend:
                return fields[status].startswith("DOWN") or fields[status].startswith("MAINT")
        return False
    document = json.loads(body)
    for upstream in document.get("upstreams", []):
        if upstream["address"].endswith(backend):
            return not upstream["in_rotation"]
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--status", choices=["haproxy", "rampart"], required=True)
    parser.add_argument("--status-url", required=True)
    parser.add_argument("--kill-pid", type=int, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    backend = "b" if args.status == "haproxy" else ":28602"

    target = urlsplit(args.url)
    killed_at = None
    out_at = None
    done = threading.Event()

    def watch():
        nonlocal out_at
        while not done.is_set():
            if killed_at is not None and out_at is None:
                try:
                    if out_of_rotation(args.status, args.status_url, backend):
                        out_at = time.monotonic()
                except OSError:
                    pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    connection = None
    sent = failed = 0
    start = time.monotonic()
    next_send = start
    while time.monotonic() - start < args.seconds:
        if killed_at is None and time.monotonic() - start >= 1.0:
            os.kill(args.kill_pid, signal.SIGKILL)
            killed_at = time.monotonic()
        try:
            if connection is None:
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
            connection.request("GET", target.path or "/")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failed += 1
        except (OSError, http.client.HTTPException):
            failed += 1
            if connection is not None:
                connection.close()
            connection = None
        sent += 1
        next_send += 0.01
        time.sleep(max(0.0, next_send - time.monotonic()))
    done.set()
    watcher.join()
    if out_at is None:
        rotation = "still in rotation at the end"
    else:
        rotation = f"out of rotation {1000 * (out_at - killed_at):.0f} ms after the kill"
    print(f"{args.label:<36} {sent} requests, {failed} failed; dead backend {rotation}")


if __name__ == "__main__":
    main()
