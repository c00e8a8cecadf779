"""A real two-node Ray cluster on this machine, for tests and benchmarks.

`LocalCluster` starts a head node and a worker node with `ray start --block` on 127.0.0.1, each
in its own process group (setsid), with its own --temp-dir and free ports, token authentication
with a token of its own (never the shared ~/.ray/auth_token), and tears down exactly those
process groups, also when a test fails. It never runs `ray stop`, which would end every Ray
process of the user on the machine, other clusters included.

    with LocalCluster() as cluster:
        subprocess.run([..., "nas", "search", CONFIG, "--address", cluster.address], env=cluster.env)
        cluster.kill_worker()

The `local_cluster` fixture (tests/test_cluster.py) wraps it for pytest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, taken: set[int] = frozenset()) -> list[int]:
    """`n` distinct free ports, none in `taken`. Every socket stays bound until all are chosen: ports asked
    for one after another can come back equal (the kernel hands a just-closed port out again), and Ray
    refuses two components on one port."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in taken:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    """Head + worker node (`num_cpus` CPUs each) on 127.0.0.1; a context manager.

    Attributes once started: `address` (GCS, "127.0.0.1:PORT", for `nas search --address`),
    `dashboard_url` (for `ray job submit --address`), `env` (the environment every driver and
    CLI call needs: RAY_AUTH_MODE=token and this cluster's token), `head_node_id`,
    `worker_node_id`.
    """

    def __init__(self, num_cpus: int = 1, worker_cpus: int | None = None, start_timeout: float = 180.0,
                 log_dir: Path | None = None, with_worker: bool = True, env: dict[str, str] | None = None,
                 cores: dict[str, set[int]] | None = None):
        """`with_worker=False`: a head node alone. `env`: extra variables for the nodes (and drivers).
        `cores`: pin a node's processes to CPU cores, e.g. {"head": {0}, "worker": {1}} (benchmarks)."""
        self.num_cpus, self.worker_cpus = num_cpus, num_cpus if worker_cpus is None else worker_cpus
        self.with_worker, self.cores = with_worker, cores or {}
        self.start_timeout = start_timeout
        tag = uuid.uuid4().hex[:8]
        # short paths: Ray's unix sockets live under --temp-dir and must stay below 108 bytes
        self.root = Path(tempfile.gettempdir()) / f"ray-test-{tag}"
        self.log_dir = log_dir or self.root / "logs"
        self.token = secrets.token_hex(32)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,  # this cluster's own token; ~/.ray/auth_token is left alone
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run the venv's python
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(k, None)
        self.port = self.dashboard_port = 0
        self._given: set[int] = set()  # every port handed to a node of this cluster
        self.procs: dict[str, subprocess.Popen] = {}
        self.head_node_id = self.worker_node_id = ""
        self.worker_name = "worker"

    # ------------------------------------------------------------------ properties
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ports(self, n: int) -> list[int]:
        """`n` free ports none of this cluster's nodes was given before (a node may bind its ports late)."""
        ports = free_ports(n, self._given)
        self._given.update(ports)
        return ports

    def _node_ports(self) -> list[str]:
        flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
        return [a for flag, port in zip(flags, self._ports(len(flags))) for a in (flag, str(port))]

    def _spawn(self, name: str, args: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cores = self.cores.get("head" if name == "head" else "worker")
        log = (self.log_dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--temp-dir", str(self.root / name), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # setsid: the node and every process it starts form one group
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        log.close()

    def start(self) -> None:
        self.port, self.dashboard_port, client_port = self._ports(3)
        self._spawn("head", ["--head", "--port", str(self.port), "--num-cpus", str(self.num_cpus),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(client_port), *self._node_ports()])
        self.head_node_id = self._wait_nodes(1)[0]
        if self.with_worker:
            self.start_worker()

    def start_worker(self) -> None:
        """Start (or, after kill_worker, replace) the worker node and wait until it is alive."""
        if self.worker_name in self.procs:
            self.worker_name = f"worker{len(self.procs)}"  # a fresh --temp-dir for the new node
        self._spawn(self.worker_name, ["--address", self.address, "--num-cpus", str(self.worker_cpus),
                                       *self._node_ports()])
        lost = {self.worker_node_id} - {""}
        ids = self._wait_nodes(2, exclude=lost)
        self.worker_node_id = next(i for i in ids if i != self.head_node_id)

    def state(self, what: str) -> list[dict]:
        """A list from the dashboard's state API (`nodes`, `actors`, ...), authenticated with the token."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/{what}?limit=10000",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]

    def alive_actors(self, node_id: str | None = None) -> list[dict]:
        return [a for a in self.state("actors")
                if a.get("state") == "ALIVE" and (node_id is None or a.get("node_id") == node_id)]

    def _wait_nodes(self, n: int, exclude: set[str] = frozenset()) -> list[str]:
        deadline = time.time() + self.start_timeout
        last = ""
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None and name in ("head", self.worker_name):
                    raise ClusterError(f"ray start ({name}) exited with {p.returncode}:\n{self._tail(name)}")
            try:
                nodes = [x for x in self.alive_nodes() if x["node_id"] not in exclude]
                if len(nodes) >= n:
                    heads = sorted(nodes, key=lambda x: not x.get("is_head_node"))
                    return [x["node_id"] for x in heads]
            except (OSError, ValueError, KeyError) as e:
                last = str(e)
            time.sleep(1.0)
        raise ClusterError(f"{n} Ray node(s) not alive within {self.start_timeout:.0f} s ({last}):\n"
                           + "\n".join(self._tail(k) for k in self.procs))

    def _tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _kill_group(self, name: str, sig: int) -> None:
        p = self.procs.get(name)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)  # the group setsid made: pgid == pid of `ray start`
        except ProcessLookupError:
            pass

    def _node_pids(self, name: str) -> list[int]:
        """Every process of a node: its session (setsid made `ray start` the leader; Ray's workers
        make their own process groups but stay in the session) and the descendants of those (a
        job's driver runs in a session of its own)."""
        p = self.procs.get(name)
        if p is None:
            return []
        table = _process_table()
        mine = {pid for pid, (_, sid) in table.items() if sid == p.pid} | ({p.pid} if p.poll() is None else set())
        grown = True
        while grown:
            extra = {pid for pid, (ppid, _) in table.items() if ppid in mine and pid not in mine}
            mine |= extra
            grown = bool(extra)
        mine.discard(os.getpid())
        return sorted(pid for pid in mine if pid in table)

    def kill_worker(self) -> None:
        """SIGKILL every process of the worker node at once (a lost machine)."""
        pids = self._node_pids(self.worker_name)
        self._kill_group(self.worker_name, signal.SIGKILL)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        self.procs[self.worker_name].wait(timeout=30)

    def stop(self) -> None:
        """End exactly this cluster's processes (SIGTERM, then SIGKILL) and remove its temp dirs."""
        pids = {name: self._node_pids(name) for name in self.procs}
        for name in self.procs:
            self._kill_group(name, signal.SIGTERM)
        # `ray start --block` rarely exits within 15 s of SIGTERM here (a module teardown took 17 s): give it
        # 3 s, then SIGKILL what is left, as below
        deadline = time.time() + 3
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        for name in self.procs:
            self._kill_group(name, signal.SIGKILL)
            for pid in sorted(set(pids[name]) | set(self._node_pids(name))):
                _kill(pid, signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(self._node_pids(name) for name in self.procs):
            time.sleep(0.2)  # SIGKILLed processes need a moment to be gone
        for name in self.procs:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def remove(self) -> None:
        """Also delete the logs (kept by stop() for a failed test's report)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        table[int(d.name)] = (int(fields[1]), int(fields[3]))
    return table


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # a manual check: start, list the nodes, stop
    t = time.time()
    with LocalCluster() as c:
        print(f"up in {time.time() - t:.1f} s: {c.address} {c.dashboard_url} head {c.head_node_id[:8]} "
              f"worker {c.worker_node_id[:8]}")
        print([n["node_id"][:8] for n in c.alive_nodes()])
    c.remove()
