"""Cells run here or on Ray give the same results in the order of the cells; a failed cell is reported and never
takes the rest down; a resume folder skips finished cells for either executor and never trusts a bad file."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from mhacompress.errors import UsageError
from mhacompress.executors import cell_key, function_path, run_cells

CALLS = []  # cells the local executor ran, in this process


def square(cell):
    """The toy cell: sleeps (to shuffle completion order on Ray), fails on request, returns x squared."""
    CALLS.append(cell)
    time.sleep(cell.get("sleep", 0))
    if cell.get("fail"):
        raise ValueError("bad cell\nwith a traceback-like second line")
    return {"square": cell["x"] ** 2, "pair": (cell["x"], -cell["x"])}


def not_json(cell):
    return {"value": object()}


def cells(n=5, fail=(), sleep=False):
    return [{"x": x, **({"fail": True} if x in fail else {}), **({"sleep": 0.2 * (n - x)} if sleep else {})}
            for x in range(n)]


@pytest.fixture(autouse=True)
def fresh_calls():
    CALLS.clear()


def test_results_come_in_the_order_of_the_cells_with_json_types():
    results = run_cells(cells(4), square)
    assert [r["cell"]["x"] for r in results] == [0, 1, 2, 3]
    assert [r["result"] for r in results] == [{"square": x * x, "pair": [x, -x]} for x in range(4)]  # tuple -> list
    assert all(r["ok"] and r["error"] is None and r["seconds"] >= 0 and not r["resumed"] for r in results)


def test_a_failed_cell_is_one_line_and_never_takes_the_rest_down():
    results = run_cells(cells(4, fail=(1,)), "test_executors:square")
    assert [r["ok"] for r in results] == [True, False, True, True]
    assert results[1]["error"] == "ValueError: bad cell" and results[1]["result"] is None
    assert run_cells([{"x": 1}], not_json)[0]["error"].startswith("TypeError: Object of type object is not JSON")


def refused(cell):
    """A cell refused as the library refuses bad input: a UsageError (or its ConfigError) with the fix in its text."""
    from mhacompress.reduction.config import ConfigError

    raise (ConfigError if cell["x"] else UsageError)("key dim 64 is out of range; choose one in 1..32")


def test_a_refused_cell_reads_as_its_message_without_the_exception_type():
    """A UsageError is the user's to fix, and its message says how: the type's name ('UsageError: ...') is noise in
    the user's line. Unexpected exceptions (bugs) keep their type, as above."""
    results = run_cells(cells(2), refused)
    assert [r["error"] for r in results] == ["key dim 64 is out of range; choose one in 1..32"] * 2


def test_on_result_sees_every_cell_once():
    seen = []
    run_cells(cells(3, fail=(2,)), square, on_result=seen.append)
    assert sorted(r["cell"]["x"] for r in seen) == [0, 1, 2]


def test_resume_skips_finished_cells_and_reruns_failed_ones(tmp_path):
    first = run_cells(cells(4, fail=(2,)), square, resume=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3  # successes only
    CALLS.clear()
    again = run_cells(cells(4), square, resume=tmp_path)
    assert [c["x"] for c in CALLS] == [2]  # only the cell that failed runs again
    assert [r["resumed"] for r in again] == [True, True, False, True]
    assert [r["result"] for r in again[:2]] == [r["result"] for r in first[:2]]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_resume_files_follow_the_umask_like_every_other_output(tmp_path):
    old = os.umask(0o022)
    try:
        run_cells(cells(1), square, resume=tmp_path)
    finally:
        os.umask(old)
    (stored,) = tmp_path.glob("*.json")
    assert stored.stat().st_mode & 0o777 == 0o644  # readable by the group and others: a CI job's other steps


@pytest.mark.parametrize("content", ["{\"ok\": tr", "[]", json.dumps({"cell": {"x": 99}, "ok": True, "result": 1}),
                                     json.dumps({"cell": {"x": 1}, "ok": False, "result": None}),
                                     "[" * 100_000 + "]" * 100_000,  # nested too deep: RecursionError
                                     *(json.dumps({"cell": {"x": 1}, "ok": True, "result": {"square": 1},
                                                   "seconds": s}) for s in ("slow", None, [1], -1, True, 1e400))])
def test_a_corrupt_or_foreign_resume_file_is_redone_not_trusted(tmp_path, content):
    run_cells(cells(3), square, resume=tmp_path)
    (tmp_path / f"{cell_key({'x': 1})}.json").write_text(content)
    CALLS.clear()
    results = run_cells(cells(3), square, resume=tmp_path)
    assert [c["x"] for c in CALLS] == [1]
    assert results[1]["result"]["square"] == 1
    assert json.loads((tmp_path / f"{cell_key({'x': 1})}.json").read_text())["ok"] is True  # repaired


@pytest.mark.parametrize("resume", ["", " "])
def test_an_empty_resume_folder_is_refused_not_the_current_folder(tmp_path, monkeypatch, resume):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="resume is empty; pass the folder"):
        run_cells(cells(2), square, resume=resume)
    assert not CALLS and not list(tmp_path.iterdir())


def test_a_resume_path_that_is_a_file_is_a_one_line_error_saying_what_to_pass(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="cannot use resume folder .*; pass a folder that can be created"):
        run_cells(cells(2), square, resume=tmp_path / "f")


def test_a_folder_in_a_cell_files_place_is_refused_before_any_cell_runs(tmp_path):
    """It was found only when the finished cell could not be saved, naming a temporary file, the cell's work lost."""
    (tmp_path / f"{cell_key({'x': 1})}.json").mkdir()
    with pytest.raises(UsageError, match=f"{cell_key({'x': 1})}.json is not a file.*remove it, or pass another"):
        run_cells(cells(3), square, resume=tmp_path)
    assert not CALLS


def test_cell_names_are_stable_under_key_order():
    assert cell_key({"a": 1, "b": [2, 3]}) == cell_key({"b": [2, 3], "a": 1})
    assert cell_key({"a": 1}) != cell_key({"a": 2})


def test_bad_arguments_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="executor must be one of local, ray; got 'dask'"):
        run_cells(cells(1), square, executor="dask")
    with pytest.raises(UsageError, match="top-level function"):
        run_cells(cells(1), lambda cell: cell)
    with pytest.raises(UsageError, match="cannot import 'test_executors:missing'"):
        run_cells(cells(1), "test_executors:missing")
    with pytest.raises(UsageError, match="must be 'module:function'"):
        function_path("test_executors.square")


@pytest.mark.parametrize("settings,fragment", [
    ({"address": "ray://x:1"}, "address needs executor='ray'"),  # the local executor would ignore it
    ({"executor": "ray", "address": ""}, "address is empty"),
    ({"executor": "ray", "address": "  "}, "address is empty"),
    ({"executor": "ray", "address": 5}, "address must be the Ray cluster's address"),
    ({"num_cpus": 0}, "num_cpus must be a finite number > 0"),
    ({"num_cpus": float("nan")}, "num_cpus must be a finite number > 0"),
    ({"num_cpus": "1"}, "num_cpus must be a finite number > 0"),
    ({"num_gpus": -1}, "num_gpus must be a finite number >= 0"),
    ({"num_gpus": float("inf")}, "num_gpus must be a finite number >= 0"),
    ({"num_cpus": 2}, "num_cpus and num_gpus are what each cell asks of Ray: they need executor='ray'"),
    ({"num_gpus": 1}, "num_cpus and num_gpus are what each cell asks of Ray"),  # the local executor ignored them
])
def test_executor_settings_are_refused_in_one_line_before_any_cell_runs(settings, fragment):
    """As sweep's --address, --cpus-per-cell and --gpus-per-cell are: one rule for both."""
    with pytest.raises(UsageError, match=fragment):
        run_cells(cells(1), square, **settings)
    assert CALLS == []


def test_ray_missing_is_a_one_line_error_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError,
                       match=r"needs Ray, which is not installed: pip install 'mhacompress\[distributed\]'"):
        run_cells(cells(1), square, executor="ray")


@pytest.mark.parametrize("body,why", [("raise RuntimeError('bad protobuf')", "RuntimeError: bad protobuf"),
                                      ("import grpc_missing_dependency",
                                       "ModuleNotFoundError: No module named 'grpc_missing_dependency'")])
def test_a_broken_ray_is_a_one_line_error_naming_why_not_a_traceback(body, why, tmp_path, monkeypatch):
    """A Ray install whose own dependencies clash raised a RuntimeError (or a missing module of its own) from
    sweep --executor ray, with a full traceback; it was only handled when Ray itself was missing."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(UsageError) as err:
        run_cells(cells(1), square, executor="ray")
    assert str(err.value) == (f"ray is installed but fails to import ({why}); "
                              f"reinstall it: pip install 'mhacompress[distributed]' (or: pip install 'ray[client]')")


def closed_port() -> int:
    import socket

    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_cluster_is_a_one_line_error_before_ray_retries_it(monkeypatch, scheme):
    import types

    def init(**kwargs):
        raise AssertionError("ray.init must not be called: it retries an unreachable address for a minute or more")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    address = f"{scheme}127.0.0.1:{closed_port()}"
    with pytest.raises(UsageError, match=rf"cannot reach the Ray cluster at {address}: .*check the address"):
        run_cells(cells(1), square, executor="ray", address=address)


@pytest.mark.parametrize("address, expected", [
    ("ray://head:10001", ("head", 10001)), ("ray://head", ("head", 10001)), ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("ray://[::1]:9000", ("::1", 9000)), ("[::1]:6379", ("::1", 6379)),
    ("auto", (None, 0)), ("local", (None, 0)), ("head:port", (None, 0)),
])
def test_cluster_addresses_are_read_as_ray_reads_them(address, expected):
    from mhacompress.executors import _host_port

    assert _host_port(address) == expected


@pytest.mark.slow
def test_a_real_local_ray_instance_gives_the_local_results(tmp_path, monkeypatch):
    try:
        import ray  # noqa: F401
    except ImportError:
        message = "ray is not installed (pip install -e '.[test]')"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    grid = cells(6, fail=(3,), sleep=True)  # the first cells sleep longest: Ray finishes them last
    local = run_cells(grid, square)
    completed = []
    remote = run_cells(grid, square, executor="ray", local_cpus=2, resume=tmp_path, on_result=completed.append)
    strip = [{k: r[k] for k in ("cell", "ok", "result", "error")} for r in local]
    assert [{k: r[k] for k in ("cell", "ok", "result", "error")} for r in remote] == strip
    assert [r["cell"]["x"] for r in completed] != [c["x"] for c in grid]  # completion order differs, results don't
    CALLS.clear()
    resumed = run_cells(grid, square, resume=tmp_path)  # the Ray run's resume folder serves the local executor
    assert [c["x"] for c in CALLS] == [3]
    assert [r["resumed"] for r in resumed] == [True, True, True, False, True, True]


def test_ray_is_imported_only_when_asked_for():
    import subprocess

    code = "import sys, mhacompress.executors; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
