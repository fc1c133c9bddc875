"""Latency in onnxruntime of exported original vs reduced MiniLM, side by side (interleaved runs, medians).

What a deployment that ships `mhacompress export` files sees. Each model is exported with `mhacompress.export`
(checked against PyTorch, as the CLI does) into a temporary folder; reduced models get random factors of the right
shapes, as in benchmarks/latency.py. Sessions use onnxruntime's CPU provider with its default graph optimisations;
threads: onnxruntime's default, or --threads.

    python benchmarks/onnx_latency.py                  # markdown table on stdout
    python benchmarks/onnx_latency.py --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
from latency import machine, shaped_like_reduced

from mhacompress import bench

VARIANTS = (("cp", 4), ("cp", 8), ("svd", 4), ("svd", 8))  # method, key dim d / f
SHAPES = ((1, 128), (32, 128))  # batch, sequence length


def sessions(tmp: str, threads: int | None) -> tuple[dict, int]:
    """``{label: onnxruntime session}`` of the original MiniLM and its reductions (exported and checked), and the
    vocabulary size."""
    import onnxruntime as ort

    from mhacompress.export import export_onnx
    from mhacompress.hub import load_pretrained

    model, _, _ = load_pretrained("minilm", attn_implementation="sdpa")
    d = model.config.hidden_size
    models = {"original": model.eval(), **{f"{m} d/{f}": shaped_like_reduced(model, m, d // f) for m, f in VARIANTS}}
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    out = {}
    for label, m in models.items():
        path = os.path.join(tmp, label.replace(" ", "_").replace("/", "_") + ".onnx")
        export_onnx(m, path)
        out[label] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return out, model.config.vocab_size


def run(args) -> dict:
    results = {"machine": machine(), "threads": args.threads or "onnxruntime default", "cells": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs, vocab_size = sessions(tmp, args.threads)
        for batch_size, seq_len in SHAPES:
            base = {k: v.numpy() for k, v in bench.inputs(vocab_size, batch_size, seq_len).items()}
            # what each graph reads: a BERT's takes token_type_ids too (one segment here)
            feeds = {k: {i.name: base.get(i.name, np.zeros_like(base["input_ids"])) for i in s.get_inputs()}
                     for k, s in runs.items()}
            ratios = {label: [] for label in runs if label != "original"}
            originals = []
            for _ in range(args.runs):
                calls = {k: (lambda s=s, k=k: s.run(None, feeds[k])) for k, s in runs.items()}
                seconds = bench.time_side_by_side(calls, warmup=2, repeats=args.repeats)
                originals.append(seconds["original"])
                for label in ratios:
                    ratios[label].append(seconds[label] / seconds["original"])
            results["cells"].append({"batch_size": batch_size, "seq_len": seq_len,
                                     "original_ms": statistics.median(originals) * 1e3,
                                     "ratio": {k: statistics.median(v) for k, v in ratios.items()},
                                     "range": {k: (min(v), max(v)) for k, v in ratios.items()}})
            print(f"B={batch_size} T={seq_len} done", file=sys.stderr)
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    labels = list(results["cells"][0]["ratio"])
    lines = [f"onnxruntime CPU provider, MiniLM-L6 exported by mhacompress; {m['cpu']}, threads: {results['threads']}. "
             "Cells: reduced/original latency (median over rounds of interleaved repeats; in parentheses the "
             "lowest and highest round).", "",
             "| B | T | original ms | " + " | ".join(labels) + " |", "|---:|---:|---:|" + "---:|" * len(labels)]
    for c in results["cells"]:
        cells = [(f"**{r:.2f}**" if r > 1 else f"{r:.2f}") + f" ({c['range'][k][0]:.2f}-{c['range'][k][1]:.2f})"
                 for k, r in c["ratio"].items()]
        lines.append(f"| {c['batch_size']} | {c['seq_len']} | {c['original_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of interleaved repeats per shape")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model in each round")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own choice)")
    args = parser.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
