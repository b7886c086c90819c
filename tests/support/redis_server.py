"""A real ``redis-server`` on 127.0.0.1, started and stopped by the tests themselves."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import redis

if TYPE_CHECKING:
    from callpolicy.redis import RedisStore

__all__ = ["MakeStore", "RedisServer"]


class MakeStore(Protocol):
    """The ``make_store`` fixture of tests/redis: ``RedisStore.from_url``, closed at the end."""

    def __call__(self, url: str | None = None, **options: Any) -> RedisStore: ...


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free loopback port; :meth:`stop` and :meth:`start` simulate an
    outage and its end on the same port. ``requirepass`` starts it with that password
    (``--requirepass``): :attr:`url` then carries it, :meth:`url_as` any other."""

    def __init__(self, *, start: bool = True, requirepass: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `apt-get install -y redis-server` "
                "(.ci/run and scripts/test do this)"
            )
        self._binary = binary
        self.port = _free_port()
        self._dir = tempfile.mkdtemp(prefix="callpolicy-redis-")
        self._process: subprocess.Popen[bytes] | None = None
        self._host = "127.0.0.1"
        self.requirepass = requirepass
        if start:
            self.start()

    @classmethod
    def existing(cls, url: str) -> RedisServer:
        """A server someone else started (CI), used as is: never stopped by the tests."""
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"CALLPOLICY_TEST_REDIS_URL must be on loopback, got {url}")
        server = cls(start=False)
        server.port = parsed.port or 6379
        return server

    @property
    def url(self) -> str:
        if self.requirepass is not None:
            return self.url_as(None, self.requirepass)
        return f"redis://127.0.0.1:{self.port}/0"

    def url_as(self, user: str | None, password: str | None) -> str:
        """The URL with these credentials (``None``: left out)."""
        credentials = "" if password is None else f"{user or ''}:{password}@"
        if password is None and user:
            credentials = f"{user}@"
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                *(["--requirepass", self.requirepass] if self.requirepass is not None else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT): what it was sent meanwhile is answered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain client (with the server's password, if it has one)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=0.5, password=self.requirepass
        )
