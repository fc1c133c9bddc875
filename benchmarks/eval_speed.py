"""Time scoring the bundled MiniLM on the 1,500 STS-B dev pairs: length-sorted batches with dynamic padding (what
`mhacompress eval` does) against naive batches padded to --max-length, same model, same results.

    python benchmarks/eval_speed.py [--data-dir ../shared/glue] [--repeats 3]

Prints a markdown table (the one in docs/performance.md, "GLUE evaluation speed")."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue")))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from mhacompress.eval import runner
    from mhacompress.eval.data import load_examples
    from mhacompress.eval.tasks import get_task
    from mhacompress.hub import load_pretrained

    model, tok, _ = load_pretrained("minilm")
    ex = load_examples(get_task("stsb"), data_dir=args.data_dir)
    runner.run(model, tok, ex.subset(64), batch_size=args.batch_size)  # warm-up
    rows = []
    for name, kw in (("length-sorted, dynamic padding", {}),
                     (f"naive: input order, padded to {args.max_length}", {"sort": False, "pad_to_max": True})):
        times, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = runner.run(model, tok, ex, batch_size=args.batch_size, max_length=args.max_length, **kw)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        rows.append((name, min(times), sorted(times)[len(times) // 2], min(cpu), runner.score(ex, out)["spearman"]))
    print(f"bundled MiniLM, STS-B dev ({len(ex):,} pairs = {2 * len(ex):,} sentences), batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; best and median of {args.repeats}, tokenization included; load average "
          f"{os.getloadavg()[0]:.1f} at the end (CPU seconds are summed over threads: a fairer figure on a loaded "
          f"machine)")
    print()
    print("| batching | wall best (s) | wall median (s) | CPU (s) | sentences/s | Spearman |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, best, median, cpu_s, rho in rows:
        print(f"| {name} | {best:.1f} | {median:.1f} | {cpu_s:.1f} | {2 * len(ex) / best:,.0f} | {rho:.4f} |")
    print()
    print(f"speed-up: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
