"""How many threads rvhub's work may use: ``--threads``, else every core this process may run
on (its CPU affinity mask, as ``taskset`` or a container's cpuset sets it)."""

from __future__ import annotations

import os

from ..errors import InputError


def available_cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``threads``, or every available core when None; refuses anything below 1."""
    if threads is None:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"`threads` must be a whole number of at least 1, not {threads!r}")
    return threads


def beside_writer(threads: int) -> int:
    """Compute threads for a stream whose writer thread also hashes (extract, compress): that
    thread is one of the ``threads``. On 2 cores one compute thread beside the writer extracts
    in 10.1 s where two take 13.1 s, with 30 % less CPU time (FP8 pair, docs/performance.md):
    three busy threads on two cores lose more to preemption and cache than they gain."""
    return max(1, threads - 1)
