"""The SQLite backend under another process's write lock, and paths it cannot use.

A real second process holds the file's write lock (``BEGIN IMMEDIATE``) until told to let
go over a pipe; it lets go by itself after a watchdog delay, and says which happened. A
read in this process must complete while the lock is still held: if the writer reports
that its watchdog fired, the read waited for it. No duration is asserted.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callpolicy import ResponseCache, SQLiteCacheBackend

TABLE = "callpolicy_cache_v1"
WATCHDOG = 20.0
"""Seconds the writer holds its lock when nobody tells it to let go (a failing test)."""
WRITE_TIMEOUT = 90.0
"""Our writes' busy timeout: far beyond the watchdog, so a read that waited on a write
lock would outlast the writer's hold (and be caught)."""

_WRITER = r"""
import select, sqlite3, sys
path, watchdog = sys.argv[1], float(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
db.execute(
    "INSERT OR REPLACE INTO callpolicy_cache_v1 VALUES ('writer', '{}', 0, NULL, 8, 0)"
)
print("locked", flush=True)
ready, _, _ = select.select([sys.stdin], [], [], watchdog)
line = sys.stdin.readline().strip() if ready else ""
db.execute("COMMIT")
print("released-on-request" if line == "release" else "released-by-watchdog", flush=True)
"""


class Writer:
    """Another process holding the cache file's write lock until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(WATCHDOG)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> str:
        """Tell the writer to let go; how it let go (``"released-on-request"`` when it
        still held the lock, ``"released-by-watchdog"`` when it had given up waiting)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        try:
            self.process.stdin.write("release\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        how = self.process.stdout.readline().strip()
        self.process.wait()
        return how

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def writer_of() -> Iterator[Any]:
    writers: list[Writer] = []

    def start(path: Path) -> Writer:
        writer = Writer(path)
        writers.append(writer)
        return writer

    yield start
    for writer in writers:
        writer.close()


def _never() -> dict[str, Any]:
    raise AssertionError("a hit must not call the model")


async def _anever() -> dict[str, Any]:
    raise AssertionError("a hit must not call the model")


def test_hits_complete_while_another_process_holds_the_write_lock(
    tmp_path: Path, writer_of: Any
) -> None:
    path = tmp_path / "shared.sqlite"
    backend = SQLiteCacheBackend(path, timeout=WRITE_TIMEOUT)
    cache = ResponseCache(backend=backend)
    for n in range(8):
        assert cache.set(f"k{n}", {"n": n})
    writer = writer_of(path)
    served: dict[str, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def hit(n: int) -> None:
        try:
            barrier.wait()
            served[f"k{n}"] = cache.get_or_compute(f"k{n}", _never, encode=dict, decode=dict)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def ahits() -> None:
        found = await asyncio.gather(
            *(
                cache.aget_or_compute(f"k{n}", _anever, encode=dict, decode=dict)
                for n in range(4, 8)
            )
        )
        served.update({f"k{n}": value for n, value in zip(range(4, 8), found, strict=True)})

    asyncio.run(ahits())
    how = writer.release()
    assert not errors
    assert served == {f"k{n}": ({"n": n}, "hit") for n in range(8)}
    assert how == "released-on-request", "a hit waited for another process's write lock"
    assert backend.get("writer") == "{}"  # the writer's commit is seen afterwards
    backend.close()


def test_a_read_does_not_queue_behind_our_own_write_waiting_for_the_lock(
    tmp_path: Path, writer_of: Any
) -> None:
    path = tmp_path / "queue.sqlite"
    backend = SQLiteCacheBackend(path, timeout=WRITE_TIMEOUT)
    backend.set("old", '{"a": 1}', ttl=None)
    writer = writer_of(path)
    stored = threading.Event()

    def write() -> None:
        backend.set("new", '{"b": 2}', ttl=None)  # waits for the other process's lock
        stored.set()

    setter = threading.Thread(target=write)
    setter.start()
    while not backend._write_lock.locked():  # the write is in progress (coordination only)
        time.sleep(0.001)
    assert backend.get("old") == '{"a": 1}'
    assert len(backend) == 1
    assert not stored.is_set()
    how = writer.release()
    setter.join()
    assert how == "released-on-request", "a read queued behind a write waiting for the lock"
    assert backend.get("new") == '{"b": 2}'
    backend.close()


def test_touches_made_while_locked_count_at_the_next_eviction(
    tmp_path: Path, writer_of: Any
) -> None:
    path = tmp_path / "lru.sqlite"
    backend = SQLiteCacheBackend(path, max_entries=4, timeout=WRITE_TIMEOUT)
    for key in "abc":
        backend.set(key, "1", ttl=None)
    writer = writer_of(path)  # adds a fourth entry, "writer", least recently used
    assert backend.get("a") == "1"  # its touch cannot be written now: it is kept
    assert writer.release() == "released-on-request"
    with sqlite3.connect(path) as db:
        order = [row[0] for row in db.execute(f"SELECT key FROM {TABLE} ORDER BY last_used")]
    assert order[-1] != "a"  # not written down yet
    backend.set("d", "1", ttl=None)  # applies the pending touch, then evicts two
    backend.set("e", "1", ttl=None)
    assert sorted(k for k in ("a", "b", "c", "d", "e", "writer") if backend.get(k)) == [
        "a",
        "c",
        "d",
        "e",
    ]
    backend.close()


def test_a_touch_is_written_at_once_when_nobody_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "touch.sqlite"
    with SQLiteCacheBackend(path) as backend:
        for key in "abc":
            backend.set(key, "1", ttl=None)
        assert backend.get("a") == "1"
        with sqlite3.connect(path) as db:
            order = [row[0] for row in db.execute(f"SELECT key FROM {TABLE} ORDER BY last_used")]
        assert order == ["b", "c", "a"]


def test_opening_a_ready_file_does_not_wait_for_a_writer(tmp_path: Path, writer_of: Any) -> None:
    path = tmp_path / "ready.sqlite"
    SQLiteCacheBackend(path).close()
    writer = writer_of(path)
    with SQLiteCacheBackend(path, timeout=WRITE_TIMEOUT) as backend:
        assert backend.get("missing") is None
    assert writer.release() == "released-on-request"


# -- paths that cannot hold a cache ---------------------------------------------------------
def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"path: .*" + tmp_path.name + r".* is a directory"):
        SQLiteCacheBackend(tmp_path)


def test_a_missing_parent_directory_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "cache.sqlite"
    with pytest.raises(ValueError, match=r"path: .*nowhere.*cache\.sqlite.* directory .* missing"):
        SQLiteCacheBackend(path)
    assert not path.parent.exists()


_CONSTRUCT = r"""
import json, sys
from callpolicy import SQLiteCacheBackend
try:
    SQLiteCacheBackend(sys.argv[1]).close()
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"type": None, "message": ""}))
"""


def _without_root_privileges() -> None:
    """In the child, before exec: drop the capabilities that let root write through
    permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


_PR_CAPBSET_DROP = 24


def _construct_elsewhere(path: Path) -> dict[str, Any]:
    """Construct a backend on ``path`` in another process, one that permissions bind
    (as root, without the capabilities that override them)."""
    done = subprocess.run(
        [sys.executable, "-c", _CONSTRUCT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=_without_root_privileges if os.geteuid() == 0 else None,
    )
    found: dict[str, Any] = json.loads(done.stdout)
    return found


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory whose permissions the tests change (restored for the cleanup)."""
    base = Path(tempfile.mkdtemp(prefix="callpolicy-ro-"))
    yield base
    for path in (base, *base.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)
    shutil.rmtree(base)


def test_a_read_only_directory_is_refused_naming_the_path(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    path = locked / "cache.sqlite"
    found = _construct_elsewhere(path)
    assert found["type"] == "ValueError", found
    assert str(path) in found["message"]
    assert not path.exists()


def test_a_read_only_file_is_refused_naming_it(shared_dir: Path) -> None:
    writable = shared_dir / "open"
    writable.mkdir()
    writable.chmod(0o777)
    path = writable / "cache.sqlite"
    SQLiteCacheBackend(path).close()
    path.chmod(0o444)
    found = _construct_elsewhere(path)
    assert found["type"] == "ValueError", found
    assert str(path) in found["message"]


def test_a_usable_shared_path_opens_elsewhere(shared_dir: Path) -> None:
    # The same helper on a writable path succeeds: the refusals above are about the path.
    writable = shared_dir / "fine"
    writable.mkdir()
    writable.chmod(0o777)
    assert _construct_elsewhere(writable / "cache.sqlite") == {"type": None, "message": ""}


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, True, "5"])
def test_a_bad_timeout_is_refused_naming_it(tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SQLiteCacheBackend(tmp_path / "t.sqlite", timeout=timeout)
