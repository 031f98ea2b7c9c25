"""A throwaway Redis Cluster on this host: redis-server processes, for tests, benchmarks and trials.

Production runs on a cluster someone operates; this starts one from Debian's ``redis-server`` and
``redis-cli`` (3 masters with a replica each by default) in a folder of its own, so that the cluster
backends are tested against the real thing, failover included: :meth:`LocalRedisCluster.kill_master`
kills a master's process and its replica takes over after ``node_timeout_ms``.

Usage::

    with LocalRedisCluster(tmp_dir) as cluster:
        url = cluster.url  # redis+cluster://127.0.0.1:PORT, as open_transient_store takes it
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class ClusterStartError(RuntimeError):
    """The cluster could not be started (no redis-server, ports taken, nodes that never agreed)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` ports p, each with p + 10000 free as well (a cluster node's bus port)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 55_000 - n, n)
        ports = list(range(base, base + n))
        if all(_port_free(p) and _port_free(p + 10_000) for p in ports):
            return ports
    raise ClusterStartError(f"found no {n} free consecutive ports with free bus ports")


class LocalRedisCluster:
    """Redis Cluster of ``masters × (1 + replicas)`` local redis-server processes.

    Args:
        folder: Where the nodes keep their cluster config and logs (one sub-folder per node).
        masters: Master nodes; the 16384 slots are split between them.
        replicas: Replicas per master.
        node_timeout_ms: ``cluster-node-timeout``: how long a master may be unreachable before its
            replica is promoted. Short, so a failover in a test takes about a second or two.

    """

    def __init__(self, folder: str | Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        self.folder = Path(folder)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT,...``: every node a seed, so a client starts whichever is down."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout_s: float = 30.0) -> LocalRedisCluster:
        """Start the nodes, join them into a cluster and wait until every slot is served.

        Raises:
            ClusterStartError: If ``redis-server`` or ``redis-cli`` is missing, or the cluster did not
                come up within ``timeout_s``.

        """
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise ClusterStartError(f"{tool} not found (Debian: apt-get install redis-server)")
        n = self.masters * (1 + self.replicas)
        self.ports = _free_ports(n)
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait(lambda p=port: self._client(p).ping(), timeout_s, f"node {port} did not start")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{p}" for p in self.ports]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if create.returncode != 0:
            self.stop()
            raise ClusterStartError(f"redis-cli --cluster create failed: {create.stdout[-500:]}")
        self._wait(self._ready, timeout_s, "the cluster did not reach cluster_state:ok")
        return self

    def _start_node(self, port: int) -> None:
        home = self.folder / str(port)
        home.mkdir(parents=True, exist_ok=True)
        options = {
            "port": port,
            "bind": "127.0.0.1",
            "cluster-enabled": "yes",
            "cluster-config-file": home / "nodes.conf",
            "cluster-node-timeout": self.node_timeout_ms,
            "save": "",
            "appendonly": "no",
            "repl-diskless-sync-delay": 0,  # a replica synced at once can be promoted at once
            "dir": home,
            "logfile": home / "redis.log",
        }
        self._procs[port] = subprocess.Popen(
            ["redis-server", *(arg for k, v in options.items() for arg in (f"--{k}", str(v)))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @staticmethod
    def _client(port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)

    def _wait(self, check: object, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.exceptions.RedisError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ClusterStartError(message)

    def _live(self) -> list[int]:
        return [p for p in self.ports if self._procs[p].poll() is None]

    def _ready(self) -> bool:
        """Every live node sees the cluster as ok, every slot served by a live master, every replica set.

        A replica counts once a live node sees it as one: until then a killed master has none to
        promote. After a failover the killed master's replica is a master without a replica of its own.
        """
        live = self._live()
        replicas = self.masters * self.replicas - (len(self.ports) - len(live))
        for port in live:
            client = self._client(port)
            info = client.cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_size", 0)) != self.masters:
                return False
            nodes = client.cluster("nodes")
            for address, node in nodes.items():
                node_port = int(address.split("@")[0].rsplit(":", 1)[1])
                if node["slots"] and ("fail" in node["flags"] or node_port not in live):
                    return False
            if sum("slave" in n["flags"] and "fail" not in n["flags"] for n in nodes.values()) < replicas:
                return False
        online = 0  # a replica that has not synced yet cannot be promoted
        for port in live:
            info = self._client(port).info("replication")
            if info["role"] == "master":
                online += sum(
                    1 for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"
                )
        return online >= replicas

    def master_ports(self) -> list[int]:
        """Ports of the live nodes that are masters now."""
        return [p for p in self._live() if self._client(p).info("replication")["role"] == "master"]

    def kill_master(self, port: int | None = None) -> int:
        """Kill a master's process (SIGKILL: no goodbye to the cluster); returns its port.

        Its replica is promoted once the others have missed it for ``node_timeout_ms``; until then
        its slots answer nothing.
        """
        port = port if port is not None else self.master_ports()[0]
        proc = self._procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return port

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait until the cluster serves every slot again; returns the seconds waited.

        Raises:
            ClusterStartError: If it did not within ``timeout_s``.

        """
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._ready():
                    return time.monotonic() - start
            except redis.exceptions.RedisError:
                pass
            time.sleep(0.05)
        raise ClusterStartError(f"the cluster did not recover within {timeout_s} s")

    def stop(self) -> None:
        """Stop every node."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
