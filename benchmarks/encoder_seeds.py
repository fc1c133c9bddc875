"""The sentence encoder's STS-B drop over calibration seeds: how much the 512 calibration sentences (and the
solver's seed) alone move the figures issue 10 holds the default path to, so that a change of method is judged
against that spread rather than on one draw.

Each (key dim, seed) cell reduces the bundled MiniLM by the default path (`reduce minilm -k K --calibrate SOURCE`),
calibrated on SOURCE's train sentences (pairs split into single sentences, 512 drawn with the seed; the solver gets
the same seed), then scores the STS-B dev and train pairs zero-shot (Spearman of the cosine of mean-pooled
embeddings) beside the original, and the eight-set embedding distance of benchmarks/fidelity.py. Cells run as
separate processes, --jobs at a time, one CPU thread each (on a GPU they share it).

    python benchmarks/encoder_seeds.py --key-dims 48,96 --seeds 0-5 --device cuda --jobs 10
    python benchmarks/encoder_seeds.py --key-dims 48 --seeds 0-2 --jobs 1      # 2-core CPU: ~5 min a cell, idle
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue")))
    p.add_argument("--key-dims", default="48,96")
    p.add_argument("--seeds", default="0-2", help="a range A-B or a comma-separated list")
    p.add_argument("--source", default="mrpc", help="GLUE task whose train sentences calibrate (not stsb)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="cells at once")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per cell (0: 1 with --jobs > 1, else all)")
    p.add_argument("--json", help="also write the cells here")
    p.add_argument("--cell", nargs=2, type=int, metavar=("KEY_DIM", "SEED"), help=argparse.SUPPRESS)
    return p.parse_args()


def seeds(spec: str) -> list[int]:
    if "-" in spec:
        low, high = spec.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in spec.split(",")]


def cell(args, key_dim: int, seed: int) -> dict:
    """One reduction and its scores (run in its own process)."""
    import fidelity
    import torch

    from mhacompress import Calibration, ReductionConfig, compress
    from mhacompress.calibration import calibration_texts
    from mhacompress.eval.compare import Scorer
    from mhacompress.hub import load_pretrained

    pairs = calibration_texts(args.source, args.samples, seed=seed, data_dir=args.data_dir)
    sentences = [s for example in pairs for s in example]  # (pairs split: the encoder sees single sentences)
    texts = [sentences[i] for i in sorted(random.Random(seed).sample(range(len(sentences)), args.samples))]
    model, tok, _ = load_pretrained("minilm")
    config = ReductionConfig(key_dim=key_dim, seed=seed, calibration=Calibration(args.source, samples=args.samples))
    start = time.perf_counter()
    reduced = compress(model, config, tokenizer=tok, calibration=texts, device=args.device).model
    seconds = time.perf_counter() - start
    original = load_pretrained("minilm")[0].to(reduced.device)
    drops = {}
    for split in ("validation", "train"):
        score = Scorer.for_task("stsb", split, data_dir=args.data_dir, device=args.device)
        drops[split] = score(original, tok)["spearman"] - score(reduced, tok)["spearman"]
    sets = fidelity.text_sets(args.data_dir, 400)
    with torch.no_grad():
        distance = {name: 1e3 * float(1 - (fidelity.embed(reduced, tok, t) * fidelity.embed(original, tok, t))
                                      .sum(-1).mean()) for name, t in sets.items()}
    return {"key_dim": key_dim, "seed": seed, "seconds": round(seconds, 1), "dev_drop": drops["validation"],
            "train_drop": drops["train"], "distance": statistics.mean(distance.values()), "sets": distance}


def run_cells(args) -> list[dict]:
    todo = [(k, s) for k in (int(x) for x in args.key_dims.split(",")) for s in seeds(args.seeds)]
    threads = args.threads or (1 if args.jobs > 1 else os.cpu_count())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    base = [sys.executable, __file__, "--data-dir", args.data_dir, "--source", args.source, "--samples",
            str(args.samples), "--device", args.device]
    running, rows = [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            k, s = todo.pop(0)
            running.append(subprocess.Popen([*base, "--cell", str(k), str(s)], env=env, stdout=subprocess.PIPE,
                                            text=True))
        done = running.pop(0)
        out, _ = done.communicate()
        if done.returncode:
            sys.exit(f"a cell failed (exit {done.returncode}): {done.args[-2:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"key dim {rows[-1]['key_dim']} seed {rows[-1]['seed']}: dev {rows[-1]['dev_drop']:.4f} train "
              f"{rows[-1]['train_drop']:.4f} distance {rows[-1]['distance']:.2f} ({rows[-1]['seconds']} s)",
              file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| key dim | seeds | STS-B dev drop: mean (sd; min to max) | STS-B train drop | eight-set distance |",
             "|---:|---:|---|---|---|"]
    for k in sorted({r["key_dim"] for r in rows}, reverse=True):
        cells = sorted((r for r in rows if r["key_dim"] == k), key=lambda r: r["seed"])

        def spread(key, fmt):
            v = [r[key] for r in cells]
            if len(v) == 1:
                return f"{v[0]:{fmt}} (one seed)"
            return f"{statistics.mean(v):{fmt}} ({statistics.stdev(v):{fmt}}; {min(v):{fmt}} to {max(v):{fmt}})"

        lines.append(f"| {k} | {len(cells)} | {spread('dev_drop', '.4f')} | {spread('train_drop', '.4f')} | "
                     f"{spread('distance', '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.cell:
        print(json.dumps(cell(args, *args.cell)))
        return
    rows = run_cells(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(summary(rows))


if __name__ == "__main__":
    main()
