"""Reduction speed on a shared machine: idle, then beside CPU-burning neighbour processes, side by side in one run.

A BERT-base-sized random model (BertConfig() defaults: 12 layers, hidden 768, 12 heads) is reduced weights-only at
key dim 192, twice per round: once with the machine to itself, once beside ``--neighbours`` processes that spin
on a core each. Rows:

- ``decompose_layers``: all layers' cp at once, one single-threaded worker per core (what a weights-only
  reduction should call);
- ``reduce_``: the in-place surgery, one layer after another (each layer's solver single-threaded);
- with ``--calibrated N``, also ``compress`` with ``--calibrate mrpc --samples N``: the default data-aware path, whose
  forward passes use torch's intra-op threads.

The target is a slowdown within 2x of idle: with 2 busy neighbours on 2 cores, the fair share of a 2-worker job.

    python benchmarks/contention.py                    # 2 neighbours, 2 rounds, markdown table
    python benchmarks/contention.py --neighbours 4 --rounds 3
    python benchmarks/contention.py --calibrated 128    # and the calibrated path on 128 MRPC sequences
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path


def spin() -> None:  # a neighbour: one core, busy, forever
    while True:
        pass


@contextmanager
def neighbours(count: int):
    """``count`` processes spinning until the block ends."""
    procs = [mp.get_context("spawn").Process(target=spin, daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let them get going
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()


def build(layers: int):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=layers)).eval()


def weights(model) -> list:
    return [(x.attention.self.query.weight.detach(), x.attention.self.key.weight.detach()) for x in model.encoder.layer]


def warm_up(model) -> None:
    """One small decomposition per worker first: library loading and thread start-up are not what is measured."""
    from mhacompress.reduction.decompose import decompose_layers

    decompose_layers(weights(model)[:2], model.config.num_attention_heads, 8, "cp", n_iter_max=2)


def runs(model, key_dim: int) -> dict:
    """name -> a function timing one reduction (seconds, mean relative error)."""
    import copy

    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.decompose import decompose_layers
    from mhacompress.reduction.surgery import reduce_

    def batched():
        start = time.perf_counter()
        factors = decompose_layers(weights(model), model.config.num_attention_heads, key_dim, "cp")
        return time.perf_counter() - start, statistics.mean(f.relative_error for f in factors)

    def surgery():
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        block = reduce_(fresh, ReductionConfig(key_dim=key_dim))
        return time.perf_counter() - start, statistics.mean(x["relative_error"] for x in block["layers"])

    return {"decompose_layers (all layers, one worker per core)": batched, "reduce_ (layer after layer)": surgery}


def calibrated_run(model, key_dim: int, samples: int):
    """The default data-aware path, `compress` with ``--calibrate mrpc --samples N`` (sequential, output objective,
    compensation): its forward passes run on torch's intra-op threads, its solves single-threaded."""
    import copy

    from transformers import AutoTokenizer

    from mhacompress import compress
    from mhacompress.hub import bundled_model_path
    from mhacompress.reduction.config import Calibration, ReductionConfig

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())  # BERT's 30,522-token vocabulary
    data_dir = os.environ.get("MHACOMPRESS_GLUE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "glue"))
    config = ReductionConfig(key_dim=key_dim, calibration=Calibration("mrpc", samples=samples))

    def run():
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        report = compress(fresh, config, tokenizer=tokenizer, data_dir=data_dir).report
        return time.perf_counter() - start, statistics.mean(x["relative_error"] for x in report["layers"])

    return {f"compress --calibrate mrpc --samples {samples} (layer after layer, with forward passes)": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-dim", type=int, default=192)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--neighbours", type=int, default=2, help="CPU-burning processes beside the busy runs")
    parser.add_argument("--rounds", type=int, default=2, help="idle/busy pairs per row (medians are reported)")
    parser.add_argument("--calibrated", type=int, default=0, metavar="SAMPLES",
                        help="also time the calibrated path on this many MRPC sequences (GLUE from "
                             "$MHACOMPRESS_GLUE_DIR, default ../shared/glue)")
    args = parser.parse_args()

    import torch

    model = build(args.layers)
    load = os.getloadavg()[0]
    warm_up(model)
    cases = runs(model, args.key_dim)
    if args.calibrated:
        cases.update(calibrated_run(model, args.key_dim, args.calibrated))
    table = {name: {"idle": [], "busy": [], "error": None} for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            seconds, table[name]["error"] = run()
            table[name]["idle"].append(seconds)
            with neighbours(args.neighbours):
                table[name]["busy"].append(run()[0])

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} usable cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average before: {load:.1f}; BERT-base size "
          f"({args.layers} layers), cp key dim {args.key_dim}; {args.neighbours} spinning neighbours; "
          f"medians of {args.rounds} rounds\n")
    print("| run | idle s | busy s | slowdown | mean relative error |\n|---|---:|---:|---:|---:|")
    for name, row in table.items():
        idle, busy = statistics.median(row["idle"]), statistics.median(row["busy"])
        print(f"| {name} | {idle:.2f} | {busy:.2f} | {busy / idle:.2f}x | {row['error']:.4f} |")


if __name__ == "__main__":
    main()
