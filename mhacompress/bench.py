"""Latency measurement, original beside reduced: medians of repeated runs after warm-up, interleaved so that load
from other processes hits both sides alike. Library code: returns numbers, never prints."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def inputs(vocab_size: int, batch_size: int, seq_len: int, *, seed: int = 0) -> dict:
    """A full (unpadded) batch of random token ids: ``input_ids`` and ``attention_mask`` (B, T)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def time_side_by_side(fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2,
                      cpu: dict | None = None, device=None) -> dict:
    """``{name: median wall seconds}`` of each callable; every round runs each once, in turn (interleaved).

    ``cpu``, when given, receives ``{name: median process CPU seconds}``: on a machine shared with other jobs, CPU
    time leaves out the time this process waited for a core, so its ratios are steadier than wall-clock ones.
    On an accelerator (``device``), every run is synchronised before its clock stops.
    """
    import torch

    sync = _synchronizer(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, fn in fns.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.update({name: statistics.median(ts) for name, ts in cpu_times.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def _synchronizer(device) -> Callable[[], None]:
    import torch

    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return torch.cuda.synchronize
    if kind == "mps":
        return torch.mps.synchronize
    return lambda: None


def model_latency(original, reduced, batch: dict, **kwargs) -> dict:
    """Median seconds of a whole forward pass of each model on ``batch``."""
    return time_side_by_side({"original": lambda: original(**batch), "reduced": lambda: reduced(**batch)}, **kwargs)


def attention_latency(original, reduced, batch_size: int, seq_len: int, *, layer: int = 0, **kwargs) -> dict:
    """Median seconds of one self-attention module of each model on random hidden states (B, T, d), no mask."""
    import torch

    from .reduction.modeling import arch_for, attention_modules

    a, b = attention_modules(original)[layer][2], attention_modules(reduced)[layer][2]
    d = getattr(original.config, arch_for(original.config).hidden)
    x = torch.randn(batch_size, seq_len, d, generator=torch.Generator().manual_seed(0))  # (B, T, d)
    weight = next(a.parameters())
    x = x.to(device=weight.device, dtype=weight.dtype)  # a half-precision model's hidden states are half too
    return time_side_by_side({"original": lambda: a(x), "reduced": lambda: b(x)}, **kwargs)


def with_ratio(seconds: dict, cpu: dict | None = None) -> dict:
    """Milliseconds of both sides and reduced/original (below 1: the reduced model is faster); with ``cpu`` (from
    time_side_by_side), the same ratio in process CPU time."""
    out = {"original_ms": seconds["original"] * 1e3, "reduced_ms": seconds["reduced"] * 1e3,
           "ratio": seconds["reduced"] / seconds["original"]}
    if cpu:
        out["cpu_ratio"] = cpu["reduced"] / cpu["original"]
    return out
