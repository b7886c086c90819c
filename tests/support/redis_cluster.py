"""A real Redis Cluster (3 primaries) and a real Sentinel setup (a primary, a replica and a
Sentinel) on 127.0.0.1, started and stopped by the tests themselves on free ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.redis_server import _free_port

__all__ = ["RedisClusterNodes", "SentinelGroup"]


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: `apt-get install -y redis-server`")
    return found


def _wait(what: str, ready: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Processes:
    """``redis-server`` processes in a temporary directory, stopped together."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._args: dict[int, tuple[str, ...]] = {}

    def start(self, port: int, *args: str) -> None:
        """Start a server on ``port`` (with the arguments of its last start if none)."""
        args = args or self._args[port]
        self._args[port] = args
        self._processes[port] = subprocess.Popen(
            [_binary("redis-server"), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5) as client:
            _wait(f"redis on port {port}", lambda: bool(client.ping()))

    def stop(self, port: int) -> None:
        process = self._processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for port in list(self._processes):
            self.stop(port)
        shutil.rmtree(self.dir, ignore_errors=True)


def _server_args(port: int, *extra: str) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        *extra,
    ]


class RedisClusterNodes:
    """Three cluster-enabled ``redis-server`` primaries joined by ``redis-cli --cluster
    create`` (the slots split in three), each with its cluster bus on a free port too."""

    def __init__(self, primaries: int = 3) -> None:
        self.ports = [_free_port() for _ in range(primaries)]
        self._processes = _Processes("callpolicy-cluster-")
        try:
            for port in self.ports:
                self._processes.start(
                    port,
                    *_server_args(
                        port,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(_free_port()),
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--dir",
                        str(self._processes.dir),
                    ),
                )
            subprocess.run(
                [
                    _binary("redis-cli"),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
            for port in self.ports:
                with self.node(port) as node:
                    _wait(
                        f"cluster node {port} to see every slot",
                        lambda node=node: (  # type: ignore[misc]
                            node.cluster("info")["cluster_state"] == "ok"
                            and len(node.cluster("slots")) == primaries
                        ),
                    )
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming one node (the client finds the others)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (it does not follow redirections)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def kill(self, index: int) -> None:
        """Kill primary ``index`` (``SIGKILL``): its slots are down until :meth:`revive`."""
        self._processes.stop(self.ports[index])

    def revive(self, index: int) -> None:
        """Restart primary ``index`` (it rejoins with its node id and slots); wait until
        every node sees the cluster whole again."""
        self._processes.start(self.ports[index])
        for port in self.ports:
            with self.node(port) as node:
                _wait(
                    f"cluster node {port} to see the cluster whole again",
                    lambda node=node: node.cluster("info")["cluster_state"] == "ok",  # type: ignore[misc]
                )

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2)

    def stop(self) -> None:
        self._processes.stop_all()


class SentinelGroup:
    """A primary, its replica and one Sentinel watching them as ``service``; a
    :meth:`failover` (``SENTINEL FAILOVER``) promotes the replica."""

    service = "callpolicy-test"

    def __init__(self) -> None:
        self.primary_port = _free_port()
        self.replica_port = _free_port()
        self.sentinel_port = _free_port()
        self._processes = _Processes("callpolicy-sentinel-")
        directory = str(self._processes.dir)
        try:
            self._processes.start(self.primary_port, *_server_args(self.primary_port))
            self._processes.start(
                self.replica_port,
                *_server_args(
                    self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port)
                ),
            )
            with redis.Redis(host="127.0.0.1", port=self.replica_port) as replica:
                _wait(
                    "the replica to sync",
                    lambda: replica.info("replication")["master_link_status"] == "up",
                )
            config = self._processes.dir / "sentinel.conf"
            config.write_text(
                f"port {self.sentinel_port}\n"
                "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            self._processes.start(self.sentinel_port, str(config), "--sentinel")
            with self.sentinel() as sentinel:
                _wait(
                    "the Sentinel to see the replica",
                    lambda: any(
                        r["port"] == self.replica_port and "s_down" not in r["flags"]
                        for r in sentinel.sentinel_slaves(self.service)
                    ),
                )
        except BaseException:
            self.stop()
            raise

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.sentinel_port)]

    def sentinel(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=2)

    def primary(self) -> tuple[str, int]:
        """The primary's address, as the Sentinel knows it now."""
        with self.sentinel() as sentinel:
            host, port = sentinel.sentinel_get_master_addr_by_name(self.service)
        return host.decode() if isinstance(host, bytes) else str(host), int(port)

    def failover(self) -> tuple[str, int]:
        """Promote the replica (``SENTINEL FAILOVER``); wait until the Sentinel names it and
        it takes writes. Returns the new primary's address."""
        before = self.primary()
        with self.sentinel() as sentinel:
            # NOGOODSLAVE until the Sentinel has fresh news of the replica: ask again.
            _wait(
                "the Sentinel to accept SENTINEL FAILOVER",
                lambda: bool(sentinel.execute_command("SENTINEL", "FAILOVER", self.service)),
            )
        _wait("the Sentinel to name a new primary", lambda: self.primary() != before, 30)
        host, port = self.primary()
        with redis.Redis(host=host, port=port, socket_timeout=2) as promoted:
            _wait(
                "the new primary to take writes",
                lambda: promoted.info("replication")["role"] == "master",
                30,
            )
        return host, port

    def stop(self) -> None:
        self._processes.stop_all()
