"""Why the ALS runs single-threaded: one CP-ALS solve with one and with two intra-op threads, on an idle machine and
beside CPU-spinning neighbours, side by side in one run.

The calibrated (sequential) path solves one layer at a time, so a second thread would use a core that idles meanwhile;
this measures what it would buy and what it would cost on a shared machine (CI runners, clusters).

    python benchmarks/solver_threads.py                      # widths 768 and 1024, 30 sweeps, 2 neighbours
    python benchmarks/solver_threads.py --widths 1024 --sweeps 100 --neighbours 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def spin() -> None:  # a neighbour: one core, busy, forever
    while True:
        pass


def solve_seconds(width: int, threads: int, sweeps: int) -> float:
    """Seconds of one rank-width/4 CP-ALS of a random layer (heads of 64), the solver's own thread pinning bypassed."""
    import torch

    from mhacompress.devices import cpu_threads
    from mhacompress.reduction import decompose

    gen = torch.Generator().manual_seed(0)
    wq = torch.randn(width, width, dtype=torch.float64, generator=gen)
    wk = torch.randn(width, width, dtype=torch.float64, generator=gen)
    with cpu_threads(threads):
        start = time.perf_counter()
        decompose.cp_als.__wrapped__(wq, wk, width // 64, width // 4, n_iter_max=sweeps, tol=0)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="768,1024")
    parser.add_argument("--sweeps", type=int, default=30)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs per cell")
    args = parser.parse_args()
    rows = []
    for width in map(int, args.widths.split(",")):
        best = lambda threads: min(solve_seconds(width, threads, args.sweeps) for _ in range(args.rounds))  # noqa: E731
        idle = {t: best(t) for t in (1, 2)}
        neighbours = [mp.Process(target=spin, daemon=True) for _ in range(args.neighbours)]
        for p in neighbours:
            p.start()
        time.sleep(0.5)
        try:
            busy = {t: best(t) for t in (1, 2)}
        finally:
            for p in neighbours:
                p.terminate()
        rows.append((width, idle, busy))
    print(f"{os.cpu_count()} cores; {args.sweeps} sweeps, rank width/4; best of {args.rounds}; "
          f"busy = beside {args.neighbours} spinning processes\n")
    print("| width | idle, 1 thread s | idle, 2 threads s | busy, 1 thread s | busy, 2 threads s |")
    print("|---:|---:|---:|---:|---:|")
    for width, idle, busy in rows:
        print(f"| {width} | {idle[1]:.2f} | {idle[2]:.2f} | {busy[1]:.2f} | {busy[2]:.2f} |")


if __name__ == "__main__":
    main()
