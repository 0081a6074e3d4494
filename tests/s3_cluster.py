"""What the object-storage and lost-node tests share: an S3 server (moto's, in this process) behind a TCP proxy the
test can cut (an outage without losing moto's in-memory state), a two-node local Ray cluster (its own ports, temp
dirs and HOME; auth off; ended by PID), and `forgetray run` joining it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_cluster_submit import BIN, MARKER, end_marked, free_ports, marked_pids, wait_for

REPO = Path(__file__).resolve().parents[1]
BUCKET = "forgetray-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Proxy:
    """127.0.0.1:port -> target; `down()` refuses and drops every connection until `up()` (same port)."""

    def __init__(self, target: int):
        self.target, self.port = target, free_ports(1)[0]
        self.open, self.conns, self.listener = True, [], None
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.conns = []

    def up(self) -> None:
        self._listen()


def start_s3():
    """(moto server, proxy): the store at http://127.0.0.1:<proxy.port>, with the bucket made."""
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = Proxy(port)
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    return server, proxy


def objects(port: int, prefix: str = "") -> list[str]:
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


class Cluster:
    """Two Ray nodes on this machine (one CPU each; `node2` has the resource "node2" and its processes carry
    NODE=node2 and `node2_env` in their environment), HOME a fresh folder, the store at `s3_port`."""

    def __init__(self, root: Path, s3_port: int, extra_env: dict | None = None, node2_env: dict | None = None):
        self.root, self.marker, self.node2_env = root, secrets.token_hex(8), node2_env or {}
        (root / "home").mkdir(parents=True)
        self.gcs, self.client_port, self.agent1, self.agent2 = free_ports(4)
        self.env = {
            **os.environ, MARKER: self.marker, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "HOME": str(root / "home"), "PYTHONPATH": str(REPO), **CREDENTIALS,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", **(extra_env or {}),
        }
        for name in ("RAY_ADDRESS", "FORGETRAY_STORAGE_CACHE"):
            self.env.pop(name, None)

    def ray(self, *args, env=None):
        done = subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def start(self) -> None:
        common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 1024**2),
                  "--disable-usage-stats", "--include-dashboard", "false"]
        self.ray("start", "--head", "--port", str(self.gcs), "--ray-client-server-port", str(self.client_port),
                 "--dashboard-agent-listen-port", str(self.agent1), "--temp-dir", str(self.root / "head"),
                 "--resources", '{"head_node": 1}', *common)
        self.start_node2()

    def start_node2(self) -> None:
        self.ray("start", "--address", f"127.0.0.1:{self.gcs}", "--dashboard-agent-listen-port", str(self.agent2),
                 "--temp-dir", str(self.root / "node2"), "--resources", '{"node2": 1}',
                 "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 1024**2),
                 "--disable-usage-stats", env={**self.env, **self.node2_env, "NODE": "node2"})

    def node2_pids(self, name: str = "") -> list[int]:
        out = []
        for pid in marked_pids(self.marker):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if b"NODE=node2" in environ and name in cmd:
                out.append(pid)
        return out

    def run(self, sweep: Path, storage: str, tracking: str, timeout: float, env: dict | None = None):
        """`forgetray run` joining the cluster (RAY_ADDRESS), in `root/work`; returns the process."""
        work = self.root / "work"
        work.mkdir(exist_ok=True)
        log = (self.root / "driver.log").open("w")
        return subprocess.Popen(
            [sys.executable, "-m", "forgetray.cli", "run", str(sweep), "--storage", storage, "--tracking-uri",
             tracking], cwd=work, env={**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}", **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        end_marked(self.marker)


def files_outside_caches(root: Path) -> list[str]:
    """What forgetray left on the nodes' disks: every file under HOME but its .cache, and under the driver's
    working dir but the sweep file (Ray's own session folders, --temp-dir, are Ray's)."""
    home, work = root / "home", root / "work"
    found = [p for p in home.rglob("*") if p.is_file() and ".cache" not in p.relative_to(home).parts[:1]]
    found += [p for p in work.rglob("*") if p.is_file()]
    return sorted(str(p) for p in found)


def wait_job(proc, timeout: float, root: Path) -> str:
    wait_for(lambda: proc.poll() is not None, timeout, "forgetray run to end")
    return (root / "driver.log").read_text()


__all__ = ["Cluster", "start_s3", "objects", "files_outside_caches", "wait_job", "json", "time"]
