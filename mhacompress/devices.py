"""Where computation runs: picking a torch device from a user's spec, and running CPU solvers so that they stay fast
on shared machines.

Why single-threaded workers: the solvers make many small linear-algebra calls. With several OpenMP threads per call,
every call ends at a barrier; when another process holds a core, the team waits for its descheduled thread, and a
reduction that takes 30 s on an idle machine takes ten times longer beside a busy neighbour. One intra-op thread per
worker and one worker per core (layers in parallel) has no barriers: a busy neighbour costs its fair share only.
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .errors import ConfigError, UsageError

T = TypeVar("T")
R = TypeVar("R")

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def available_devices() -> list[str]:
    """The devices this torch can use, best first: cuda:0.. , mps, cpu."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


def is_auto(spec) -> bool:
    """Whether ``spec`` leaves the device to mhacompress (``auto`` in any case, or None)."""
    return spec is None or str(spec).strip().lower() == "auto"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec``: ``auto`` (or None) picks CUDA, then MPS, then CPU; ``cpu``, ``cuda``,
    ``cuda:N`` and ``mps`` are checked against this machine. A device that does not exist raises a one-line
    ``UsageError`` naming what was asked, what exists and what to pass instead."""
    if is_auto(spec):
        return torch.device(available_devices()[0])
    text = str(spec).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise _missing(spec, f"it is not a device name (use {DEVICE_HELP})", ConfigError) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        return _check_cuda(spec, device)
    if device.type == "mps":
        if not _mps_available():
            raise _missing(spec, "MPS (Apple GPU) is not available in this torch build or on this machine")
        return torch.device("mps")
    raise _missing(spec, f"mhacompress runs on {DEVICE_HELP}", ConfigError)


def _check_cuda(spec, device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise _missing(spec, f"this torch {torch.__version__} ({build}) sees no CUDA GPU")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise _missing(spec, f"there {'is 1 CUDA GPU' if count == 1 else f'are {count} CUDA GPUs'}")
    return torch.device("cuda", device.index if device.index is not None else 0)


def _missing(spec, why: str, kind: type[UsageError] = UsageError) -> UsageError:
    """A device this machine lacks (exit 1), or, as a ConfigError, a name that is no device mhacompress runs on
    (exit 2, a bad setting)."""
    found = available_devices()
    return kind(f"device {str(spec)!r} cannot be used: {why}; this machine has {', '.join(found)}; "
                f"pass one of those or 'auto'")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def work_device(device: torch.device) -> torch.device:
    """Where the solvers compute for inputs on ``device``: there, except MPS, which has no float64: CPU."""
    return torch.device("cpu") if device.type == "mps" else device


# ---- CPU threads -------------------------------------------------------------------------------------------


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run this thread's torch CPU ops with ``n`` intra-op threads, restoring the previous count on exit. (The
    OpenMP and MKL settings it changes are per calling thread; torch also records the count for threads it starts
    later, hence the restore.)"""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers(device: torch.device | None = None) -> int:
    """Concurrent solver workers: on CPU one per core this process may use (at most torch's thread count, so
    OMP_NUM_THREADS=1 or torch.set_num_threads(1) means one); on an accelerator one (its kernels queue anyway)."""
    if device is not None and work_device(device).type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, torch.get_num_threads()))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None,
                 device: torch.device | None = None, on_done: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, in order, with ``workers`` threads (default ``default_workers(device)``), each
    running torch single-threaded. torch releases the GIL inside its ops, so layers run in parallel without any
    synchronisation between them. ``on_done(index, result)`` is called in the calling thread as each item finishes
    (progress bars). The first failure is raised, once the items already running are done; the rest never start.
    Each item runs in a copy of the caller's context (contextvars), as it would in the calling thread: a message
    raised there names the command's options when a command runs (errors.command_line)."""
    items = list(items)
    workers = min(workers or default_workers(device), max(len(items), 1))

    def single(x: T) -> R:
        with cpu_threads(1):
            return fn(x)

    if workers == 1:
        return [_done(i, single(x), on_done) for i, x in enumerate(items)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mhacompress-solver") as pool:
        futures = {pool.submit(contextvars.copy_context().run, single, x): i for i, x in enumerate(items)}
        for future in as_completed(futures):
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()
            _done(futures[future], future.result(), on_done)
        return [future.result() for future in futures]  # dicts keep submission order


def _done(index: int, result: R, on_done: Callable[[int, R], None] | None) -> R:
    if on_done:
        on_done(index, result)
    return result
