"""Interleaved, repeated timing, reported as ratios against a same-run baseline."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Result", "ThreadGang", "blocks", "paired_added_ns", "per_call_ns", "ratio_rows"]


def per_call_ns(fn: Callable[[], object], loops: int) -> float:
    """Nanoseconds per call of ``fn`` over ``loops`` calls (GC paused while timing)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        return (time.perf_counter_ns() - start) / loops
    finally:
        if gc_was_enabled:
            gc.enable()


@dataclass
class Result:
    """One row of the table: a ratio over repeats, and the absolute figures behind it."""

    name: str
    ratios: list[float]
    target: str
    passed: bool
    detail: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    info: bool = False
    """A figure shown for context (a baseline's own latency): no target, never fails."""

    @property
    def row(self) -> tuple[str, str, str, str, str, str, str]:
        low, mid, high = min(self.ratios), statistics.median(self.ratios), max(self.ratios)
        return (
            self.name,
            f"{low:.2f}",
            f"{mid:.2f}",
            f"{high:.2f}",
            self.target,
            "-" if self.info else ("yes" if self.passed else "NO"),
            self.detail,
        )


def blocks(quick: bool) -> dict[str, int]:
    """``ratio_rows``' loops and repeats for a per-call figure: many short blocks.

    A block of 400 calls lasts ~0.1 s; 31 of them per candidate, interleaved, give a
    median of per-repeat ratios that a neighbour's burst moves by one sample, where 9
    blocks of 2,000 calls (the first plan) let one burst cover a whole block.
    """
    return {"loops": 200, "repeats": 3} if quick else {"loops": 400, "repeats": 31}


def ratio_rows(
    candidates: dict[str, Callable[[], object]], *, loops: int, repeats: int
) -> dict[str, list[float]]:
    """Time every candidate ``repeats`` times, interleaved (the order rotates each repeat
    so no candidate always runs first or last); returns ns per call for each."""
    names = list(candidates)
    for fn in candidates.values():  # warm up caches, lazy imports, first-call paths
        per_call_ns(fn, max(loops // 10, 1))
    found: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            found[name].append(per_call_ns(candidates[name], loops))
    return found


def paired_added_ns(
    baseline: Callable[[], object], candidate: Callable[[], object], *, pairs: int
) -> float:
    """Median over ``pairs`` of (one candidate call - one baseline call), in ns.

    For an *added* cost that is small next to a noisy call (tens of microseconds on a
    call of hundreds), timing each pair back to back (alternating which goes first)
    and taking the median difference cancels the machine's drift that separate blocks
    of loops would each absorb differently.
    """
    clock = time.perf_counter_ns
    for _ in range(max(pairs // 10, 1)):
        baseline()
        candidate()
    differences = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(pairs):
            if index % 2:
                t0 = clock()
                candidate()
                t1 = clock()
                baseline()
                t2 = clock()
                differences.append((t1 - t0) - (t2 - t1))
            else:
                t0 = clock()
                baseline()
                t1 = clock()
                candidate()
                t2 = clock()
                differences.append((t2 - t1) - (t1 - t0))
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(differences)


class ThreadGang:
    """``threads`` long-lived threads that run one workload together, on demand.

    Timing a thread pool that is created per run also times thread start-up and lets the
    first threads finish before the last start. Here the threads exist before the clock
    starts, are released at once by a barrier, and the clock stops when the last one is
    done. Use as a context manager; :meth:`run` returns wall seconds for one round.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._start = threading.Barrier(threads + 1)
        self._done = threading.Barrier(threads + 1)
        self._work: Callable[[], object] | None = None
        self._loops = 0
        self._errors: list[BaseException] = []
        self._closing = False
        self._workers = [
            threading.Thread(target=self._serve, name=f"gang-{n}", daemon=True)
            for n in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def _serve(self) -> None:
        while True:
            self._start.wait()
            if self._closing:
                return
            work, loops = self._work, self._loops
            try:
                assert work is not None
                for _ in range(loops):
                    work()
            except BaseException as exc:  # reported by run(): a benchmark must not lie
                self._errors.append(exc)
            finally:
                self._done.wait()

    def run(self, work: Callable[[], object], loops: int) -> float:
        """Every thread calls ``work`` ``loops`` times; wall seconds for the whole round."""
        self._work, self._loops = work, loops
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            self._start.wait()
            self._done.wait()
            elapsed = time.perf_counter() - start
        finally:
            if gc_was_enabled:
                gc.enable()
        if self._errors:
            raise self._errors[0]
        return elapsed

    def __enter__(self) -> ThreadGang:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing = True
        self._start.wait()
        for worker in self._workers:
            worker.join()
