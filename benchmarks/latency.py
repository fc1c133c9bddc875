"""Latency of original vs reduced encoders on this machine, side by side (interleaved runs, medians).

Models: the bundled MiniLM (6 layers, d = 384, 12 heads) and a BERT-base-sized model (BertConfig defaults: 12 layers,
d = 768, 12 heads; random weights: speed does not depend on them). Grid: sequence lengths 32, 128, 512; batch sizes
1 and 32; key dims d, d/2, d/4, d/8; methods cp and svd; plus the exact [CLS] shortcut on cp at d/4 and d/8.
Reduced models get random factors of the right shapes (speed does not depend on the fit), so the run is the timing.

The default run skips configurations whose original forward pass costs more than --max-gmacs (60 billion multiply-adds;
about 2.5 minutes on 2 idle CPU cores); --full runs everything (about 15 minutes, 8 of them BERT-base size at
batch 32 x 512). Bigger configurations get fewer repeats (--repeats overrides).

    python benchmarks/latency.py                       # markdown tables on stdout
    python benchmarks/latency.py --runs 3              # 3 fresh processes: medians over runs, with their range
    python benchmarks/latency.py --json out/latency.json --full
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mhacompress import bench
from mhacompress.reduction.modeling import attention_modules, collaborate_, first_token_only_

SEQ_LENS = (32, 128, 512)
BATCH_SIZES = (1, 32)
FRACTIONS = (1, 2, 4, 8)  # key dim d / f
METHODS = ("cp", "svd")
SHORTCUT = ("cp", (4, 8))  # [CLS] shortcut timed on these reductions


def load_models():
    from transformers import BertConfig, BertModel

    from mhacompress.hub import load_pretrained

    minilm, _, _ = load_pretrained("minilm", attn_implementation="sdpa")
    torch.manual_seed(0)
    base = BertModel(BertConfig(attn_implementation="sdpa")).eval()
    return {"MiniLM-L6 (d=384)": minilm.eval(), "BERT-base size (d=768)": base}


def variants(model) -> dict:
    """``{label: model}``: the original, cp and svd at every key dim, and the [CLS] shortcut ones."""
    d = model.config.hidden_size
    out = {"original": model}
    for method in METHODS:
        for f in FRACTIONS:
            reduced = shaped_like_reduced(model, method, d // f)
            out[f"{method} d/{f}" if f > 1 else f"{method} d"] = reduced
            if method == SHORTCUT[0] and f in SHORTCUT[1]:
                out[f"{method} d/{f} +cls"] = first_token_only_(copy.deepcopy(reduced))
    return out


def shaped_like_reduced(model, method: str, key_dim: int):
    """A copy of ``model`` with collaborative attention of the given shape and random factors (no decomposition)."""
    reduced = copy.deepcopy(model)
    n = len(attention_modules(reduced))
    collaborate_(reduced, {"method": method, "layers": [{"index": i, "key_dim": key_dim} for i in range(n)]})
    with torch.no_grad():
        for _, _, m in attention_modules(reduced):
            for p in (m.query_proj.weight, m.key_proj.weight, m.content_bias.weight, m.mixing):
                if p is not None:
                    p.normal_(0, 0.05)
    return reduced.eval()


def gmacs(model, batch_size: int, seq_len: int) -> float:
    """Multiply-adds of the original forward pass (layers only), in billions."""
    c = model.config
    per_token = c.num_hidden_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
                                       + 2 * seq_len * c.hidden_size)
    return batch_size * seq_len * per_token / 1e9


def repeats_for(g: float) -> tuple[int, int]:
    """(warm-up, repeats): fewer for bigger configurations."""
    return (2, 25) if g < 3 else (1, 5) if g < 60 else (1, 2) if g < 400 else (1, 1)


def run(args) -> dict:
    results = {"machine": machine(), "configs": []}
    for name, model in load_models().items():
        models = variants(model)
        for seq_len in args.seq_lens:
            for batch_size in args.batch_sizes:
                g = gmacs(model, batch_size, seq_len)
                row = {"model": name, "seq_len": seq_len, "batch_size": batch_size, "gmacs": round(g, 1)}
                if g > args.max_gmacs and not args.full:
                    results["configs"].append({**row, "skipped": f"> {args.max_gmacs:g} GMACs (--full runs it)"})
                    continue
                warmup, repeats = repeats_for(g)
                repeats = args.repeats or repeats
                batch = bench.inputs(model.config.vocab_size, batch_size, seq_len)
                start = time.perf_counter()
                cpu: dict = {}
                seconds = bench.time_side_by_side({k: (lambda m=m: m(**batch)) for k, m in models.items()},
                                                  warmup=warmup, repeats=repeats, cpu=cpu)
                row.update(repeats=repeats, original_ms=seconds["original"] * 1e3,
                           original_cpu_ms=cpu["original"] * 1e3,
                           ratio={k: s / seconds["original"] for k, s in seconds.items() if k != "original"},
                           cpu_ratio={k: s / cpu["original"] for k, s in cpu.items() if k != "original"})
                results["configs"].append(row)
                print(f"{name} T={seq_len} B={batch_size}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        del models
    return results


def repeated(args) -> dict:
    """The grid run ``args.runs`` times, each in a fresh process (so that memory layout and core placement vary as
    they do between real runs); every cell becomes the median over runs, with the range."""
    flags = ["--seq-lens", *map(str, args.seq_lens), "--batch-sizes", *map(str, args.batch_sizes),
             "--max-gmacs", str(args.max_gmacs), *(["--full"] if args.full else []),
             *(["--repeats", str(args.repeats)] if args.repeats else [])]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            path = os.path.join(tmp, f"{i}.json")
            print(f"run {i + 1} of {args.runs}", file=sys.stderr)
            subprocess.run([sys.executable, __file__, *flags, "--json", path], check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                runs.append(json.load(f))
    merged = {"machine": runs[0]["machine"], "runs": args.runs, "configs": []}
    for cells in zip(*(r["configs"] for r in runs)):
        row = dict(cells[0])
        if "ratio" in row:
            row["original_ms"] = statistics.median(c["original_ms"] for c in cells)
            for key in ("ratio", "cpu_ratio"):
                row[key] = {k: statistics.median(c[key][k] for c in cells) for k in row[key]}
            row["ratio_range"] = {k: (min(c["ratio"][k] for c in cells), max(c["ratio"][k] for c in cells))
                                  for k in row["ratio"]}
        merged["configs"].append(row)
    return merged


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(results: dict) -> str:
    m, runs = results["machine"], results.get("runs", 1)
    note = (f"the median over {runs} runs, in parentheses the lowest and highest run" if runs > 1 else
            "in parentheses the same ratio of process CPU time (steadier when other jobs share the cores)")
    lines = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']} (CPU), sdpa attention. Cells are "
             f"reduced/original latency of the whole forward pass (median of interleaved repeats; below 1.00 = "
             f"faster, **bold** = slower), wall clock: {note}."]
    for name in dict.fromkeys(c["model"] for c in results["configs"]):
        rows = [c for c in results["configs"] if c["model"] == name]
        labels = next((list(c["ratio"]) for c in rows if "ratio" in c), [])
        lines += ["", f"**{name}**", "", "| T | B | original ms | " + " | ".join(labels) + " |",
                  "|---:|---:|---:|" + "---:|" * len(labels)]
        for c in rows:
            if "ratio" not in c:
                lines.append(f"| {c['seq_len']} | {c['batch_size']} | skipped ({c['gmacs']:.0f} GMACs) |"
                             + " |" * len(labels))
                continue
            spread = ({k: f"{lo:.2f}-{hi:.2f}" for k, (lo, hi) in c["ratio_range"].items()} if "ratio_range" in c
                      else {k: f"{r:.2f}" for k, r in c["cpu_ratio"].items()})
            cells = [(f"**{r:.2f}**" if r > 1 else f"{r:.2f}") + f" ({spread[k]})" for k, r in c["ratio"].items()]
            lines.append(f"| {c['seq_len']} | {c['batch_size']} | {c['original_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--max-gmacs", type=float, default=60.0, help="skip bigger configurations unless --full")
    parser.add_argument("--full", action="store_true", help="run every configuration (long)")
    parser.add_argument("--repeats", type=int, help="timed runs per cell (default: 7, fewer for big cells)")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes to run the grid in (medians, ranges)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    results = repeated(args) if args.runs > 1 else run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    main()
