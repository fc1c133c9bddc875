"""Run a list of independent cells (one sweep setting each) here, one after another, or fanned out on Ray, with
the same results in the same order either way.

    results = run_cells(cells, "mhacompress.sweep:run_cell", executor="ray", resume="sweep-done/")

A cell is a JSON-able dict; ``fn`` takes one and returns a JSON-able dict. Every result is
``{"cell", "ok", "result", "error", "seconds", "resumed"}``, in the order of ``cells`` whatever the completion order;
a cell that raises is reported (``ok`` false, ``error`` one line) and never stops the others.

``resume=DIR`` keeps one JSON file per successful cell, named by a stable hash of the cell and written atomically,
and skips cells whose file is there and valid; failed cells run again. The folder is the same for both executors,
so CI jobs can each run a slice of a sweep and merge their folders. Ray is an optional extra
(``pip install 'mhacompress[distributed]'``), imported only when asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from .errors import UsageError, check_callback, first_line, given, named

EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'mhacompress[distributed]' (or: pip install 'ray[client]')"
PROBE_SECONDS = 5.0  # how long to wait for a cluster's port to answer before calling it unreachable

Cell = dict
Result = dict


def run_cells(cells: list[Cell], fn: Callable[[Cell], dict] | str, *, executor: str = "local",
              address: str | None = None, resume: str | os.PathLike | None = None, num_cpus: float = 1,
              num_gpus: float = 0, local_cpus: int | None = None,
              on_result: Callable[[Result], None] | None = None,
              usable: Callable[[Cell, object], bool] | None = None) -> list[Result]:
    """Run ``fn`` on every cell; one result per cell, in the order of ``cells``.

    ``fn``: an importable top-level function, or its ``"module:function"`` path (what Ray workers import).
    ``executor``: ``local`` (this process, in order) or ``ray`` (one task per cell with ``num_cpus`` CPUs and
    ``num_gpus`` GPUs; on the cluster at ``address``, else on a Ray instance already started in this process,
    else on a new local one with ``local_cpus`` CPUs, default all).
    ``on_result``: called with each result as it completes (resumed cells first), e.g. for a progress bar.
    ``usable(cell, value)``: whether a stored value has the shape ``fn`` returns (a file edited by hand or written by
    another version fails it, and the cell runs again).
    """
    num_cpus, num_gpus = check_settings(executor, address, num_cpus, num_gpus)
    check_callback("on_result", on_result, "one result")
    path = function_path(fn)
    if resume is not None and not str(resume).strip():  # Path("") is the current folder
        raise UsageError("resume is empty; pass the folder to keep finished cells in, e.g. resume='out/sweep-cells'")
    store = _Store(Path(resume), usable) if resume is not None else None
    results: list[Result | None] = [store.load(cell) if store else None for cell in cells]
    for result in results:
        if result is not None and on_result:
            on_result(result)
    todo = [i for i, result in enumerate(results) if result is None]

    def finished(index: int, result: Result) -> None:
        results[index] = result
        if store and result["ok"]:
            store.save(result)
        if on_result:
            on_result(result)

    if executor == "local":
        for i in todo:
            finished(i, run_cell(path, cells[i]))
    else:
        _run_on_ray(path, cells, todo, finished, address, num_cpus, num_gpus, local_cpus)
    return results  # type: ignore[return-value]


def check_settings(executor: str, address: str | None = None, num_cpus: float = 1,
                   num_gpus: float = 0) -> tuple[float, float]:
    """Refuse in one line, before any cell runs, what the executor would ignore or fail on late (one rule for
    run_cells, run_sweep and sweep's options): an unknown executor, an address that is empty or given without the
    Ray executor (the local one ignored it), CPUs per cell that are not a finite number > 0, GPUs that are not a
    finite number >= 0, and either given without the Ray executor. Returns the CPUs and GPUs as Python numbers (a
    numpy scalar as the int or float it holds)."""
    from .reduction.config import ConfigError, _number

    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"address must be the Ray cluster's address, a str (e.g. 'ray://head:10001'); got "
                          f"{type(address).__name__}")
    if address is not None and not address.strip():
        raise ConfigError(f"{named('--address')} is empty; pass the cluster's address (e.g. ray://head:10001), or drop "
                          f"it for a local Ray instance")
    if address is not None and executor != "ray":
        raise ConfigError(f"{named('--address')} needs {given('--executor', 'ray')}, which runs the cells on that "
                          f"cluster; drop the address to run them here")
    num_cpus, num_gpus = _number("num_cpus", num_cpus, 0, above=True), _number("num_gpus", num_gpus, 0)
    if executor != "ray" and (num_cpus != 1 or num_gpus != 0):  # the local executor ignored them
        raise ConfigError(f"{named('--cpus-per-cell', 'num_cpus')} and {named('--gpus-per-cell', 'num_gpus')} are "
                          f"what each cell asks of Ray: they need {given('--executor', 'ray')}; drop them to run the "
                          f"cells here")
    return num_cpus, num_gpus


def function_path(fn: Callable | str) -> str:
    """``"module:function"`` for a top-level function (or that string, checked to import)."""
    if isinstance(fn, str):
        _import(fn)
        return fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "." in name or "<" in name or module == "__main__":
        raise UsageError(f"fn must be a top-level function of an importable module (workers import it); got {fn!r}")
    return f"{module}:{name}"


def _import(path: str) -> Callable[[Cell], dict]:
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"fn must be 'module:function'; got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot import {path!r}: {err}") from None


def run_cell(path: str, cell: Cell) -> Result:
    """One cell, failures caught: the result dict (what a Ray task returns too)."""
    start = time.perf_counter()
    try:
        value = json.loads(json.dumps(_import(path)(cell)))  # JSON-able, and the types a resume file gives back
        return _result(cell, True, value, None, time.perf_counter() - start)
    except Exception as err:  # a failed cell is reported, never raised
        return _result(cell, False, None, first_line(err), time.perf_counter() - start)


def _result(cell: Cell, ok: bool, value, error: str | None, seconds: float) -> Result:
    return {"cell": cell, "ok": ok, "result": value, "error": error, "seconds": round(seconds, 3), "resumed": False}


# ---- resume files ------------------------------------------------------------------------------------------


def cell_key(cell: Cell) -> str:
    """A stable name for a cell: the same dict (any key order) gives the same name on every machine."""
    canonical = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _seconds(value) -> bool:
    """Whether a stored cell's time is one (a finite number >= 0, not a bool): a hand-edited "slow" or null crashed
    the rerun in round()."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


class _Store:
    """One JSON file per successful cell: DIR/<cell_key>.json, written atomically."""

    def __init__(self, folder: Path, usable: Callable[[Cell, object], bool] | None = None):
        self.usable = usable
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot use resume folder {str(folder)!r}: {err.strerror or err}; pass a folder that "
                             f"can be created and written") from None
        self.folder = folder

    def load(self, cell: Cell) -> Result | None:
        """The stored result of ``cell``, or None when absent or not trusted (unreadable, another cell, failed). A
        folder (or pipe...) in the cell file's place is refused now, not once the cell has run and cannot be saved."""
        path = self.folder / f"{cell_key(cell)}.json"
        if path.exists() and not path.is_file():
            raise UsageError(f"{path} is not a file, so the cell cannot be stored; remove it, or pass another "
                             f"{named('--resume')} folder")
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
            return None
        valid = (isinstance(stored, dict) and stored.get("ok") is True and "result" in stored
                 and stored.get("cell") == json.loads(json.dumps(cell)) and self._usable(cell, stored["result"])
                 and _seconds(stored.get("seconds", 0.0)))
        return {**_result(cell, True, stored["result"], None, stored.get("seconds", 0.0)), "resumed": True} \
            if valid else None

    def _usable(self, cell: Cell, value) -> bool:
        try:
            return self.usable is None or bool(self.usable(cell, value))
        except Exception:  # a check that trips over the value: not usable
            return False

    def save(self, result: Result) -> None:
        """Written atomically, with the umask's permissions like every other output (a CI job's other users read it)."""
        from .fsio import atomic_file

        with atomic_file(self.folder / f"{cell_key(result['cell'])}.json") as tmp:
            tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "resumed"}, indent=1, sort_keys=True))


# ---- Ray -------------------------------------------------------------------------------------------------------


def _run_on_ray(path: str, cells: list[Cell], todo: list[int], finished: Callable[[int, Result], None],
                address: str | None, num_cpus: float, num_gpus: float, local_cpus: int | None) -> None:
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        if address:
            _probe(address)
        try:
            ray.init(address=address, num_cpus=None if address else local_cpus, log_to_driver=False,
                     include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise UsageError(f"cannot start or reach {where}: {first_line(err)}") from None
    try:
        task = ray.remote(run_cell).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        pending = {task.remote(path, cells[i]): i for i in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            finished(index, _ray_get(ray, done[0], cells[index]))
    finally:
        if started:
            ray.shutdown()


def _probe(address: str, seconds: float = PROBE_SECONDS) -> None:
    """Fail fast on a cluster that does not answer: Ray itself retries an unreachable address for a minute or more.

    ``ray://HOST[:PORT]`` (Ray Client, port 10001 by default) and ``HOST:PORT`` (the head's GCS) are probed with one
    TCP connection; ``auto``, ``local`` and anything else are left to Ray.
    """
    host, port = _host_port(address)
    if host is None:
        return
    try:
        socket.create_connection((host, port), timeout=seconds).close()
    except OSError as err:
        why = f"no answer in {seconds:g} s" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise UsageError(f"cannot reach the Ray cluster at {address}: {why}; check the address "
                         f"and that the head node is up ('ray status' on it)") from None


def _host_port(address: str) -> tuple[str | None, int]:
    """``(host, port)`` of a ``ray://`` or ``host:port`` address; ``(None, 0)`` when it is not one."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or (not port and not client) or (port and not port.isdigit()):
        return None, 0
    return host, int(port) if port else 10001


def _ray_get(ray, ref, cell: Cell) -> Result:
    """A task's result; a task that died (worker crash, lost node) is that cell's failure."""
    try:
        return ray.get(ref)
    except Exception as err:
        return _result(cell, False, None, first_line(err), 0.0)


def _ray():
    from .errors import imported

    return imported("ray", f"--executor ray needs Ray, which is not installed: {RAY_HINT}", RAY_HINT)
