"""Device resolution (auto picks CUDA, then MPS, then CPU; a device that does not exist is a one-line error naming
what exists) and the single-threaded worker pool the solvers run in. CPU only: accelerators are faked."""

import threading
import time

import pytest
import torch

from mhacompress.devices import (
    available_devices,
    cpu_threads,
    default_workers,
    parallel_map,
    resolve_device,
    work_device,
)
from mhacompress.errors import ConfigError, UsageError


@pytest.fixture
def machine(monkeypatch):
    """Fake the accelerators this torch sees: machine(cuda=2, mps=True)."""
    def fake(cuda: int = 0, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return fake


@pytest.mark.parametrize("cuda,mps,expected", [(0, False, "cpu"), (0, True, "mps"), (2, True, "cuda:0")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(None) == torch.device(expected)
    assert available_devices()[-1] == "cpu"


def test_explicit_devices_that_exist_are_returned(machine):
    machine(cuda=2, mps=True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("CUDA:1") == torch.device("cuda:1")
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("spec,cuda,mps,why", [
    ("cuda", 0, False, "sees no CUDA GPU"),
    ("cuda:3", 1, False, "there is 1 CUDA GPU"),
    ("cuda:2", 2, False, "there are 2 CUDA GPUs"),
    ("mps", 1, False, "MPS (Apple GPU) is not available"),
    ("gpu", 0, False, "not a device name (use auto, cpu, cuda, cuda:N or mps)"),
    ("banana", 0, True, "not a device name"),
    ("xpu", 0, False, "mhacompress runs on auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_that_does_not_exist_is_one_line_naming_what_does(machine, spec, cuda, mps, why):
    machine(cuda=cuda, mps=mps)
    with pytest.raises(UsageError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert "\n" not in message
    assert f"device {spec!r} cannot be used" in message and why in message
    assert f"this machine has {', '.join(available_devices())}" in message
    assert "pass one of those or 'auto'" in message
    # a name that is no device is a bad setting (the CLI exits 2); hardware this machine lacks is not (exit 1)
    assert isinstance(err.value, ConfigError) == (why.startswith(("not a device name", "mhacompress runs on")))


def test_cuda_on_a_cpu_only_build_says_so(machine):
    machine(cuda=0)
    if torch.version.cuda is None:
        with pytest.raises(UsageError, match=r"\(a CPU-only build\) sees no CUDA GPU; this machine has cpu"):
            resolve_device("cuda")


def test_mps_work_is_done_on_the_cpu_for_float64():
    assert work_device(torch.device("mps")) == torch.device("cpu")
    assert work_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert work_device(torch.device("cpu")) == torch.device("cpu")


def test_cpu_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("restored even when the body raises")
    assert torch.get_num_threads() == before


def test_one_worker_per_usable_core_on_cpu_and_one_on_accelerators(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1 means one
    assert default_workers(torch.device("cpu")) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert default_workers(torch.device("cpu")) >= 1
    assert default_workers(torch.device("cuda")) == 1
    assert default_workers(torch.device("mps")) == default_workers(torch.device("cpu"))


def test_parallel_map_keeps_order_runs_single_threaded_in_several_threads():
    seen, done = [], []

    def work(x):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return x * x

    def progress(index, result):
        done.append((index, result, threading.current_thread() is threading.main_thread()))

    assert parallel_map(work, range(8), workers=3, on_done=progress) == [x * x for x in range(8)]
    assert {threads for _, threads in seen} == {1}
    assert all(name.startswith("mhacompress-solver") for name, _ in seen)
    assert sorted(done) == [(x, x * x, True) for x in range(8)]  # each once, in the calling thread
    assert parallel_map(work, [], workers=3) == []


def test_parallel_map_raises_a_failure_and_starts_nothing_more():
    started = []

    def work(x):
        started.append(x)
        if x == 1:
            raise ValueError(f"item {x}")
        time.sleep(0.01)
        return x

    with pytest.raises(ValueError, match="item 1"):
        parallel_map(work, range(200), workers=2)
    assert len(started) < 50
