"""Reduction speed and quality, side by side in one run.

A BERT-base-sized model (hidden 768, 12 heads, 12 layers, random weights from BertConfig's initialiser) is reduced at
key dim 384 with the structured ALS of mhacompress, layer after layer (``reduce_``) and all layers at once
(``decompose_layers``: one single-threaded worker per core); layer 0 is also decomposed by tensorly ``parafac`` on
the dense (12, 768, 768) tensor with the 2020 reference settings (``cp_tensorly``: random init, 100 iterations), and
the errors are compared.

    python benchmarks/reduction_speed.py                 # prints a markdown table
    python benchmarks/reduction_speed.py --skip-tensorly # without the ~100 s reference run
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--skip-tensorly", action="store_true")
    args = parser.parse_args()

    from transformers import BertConfig, BertModel

    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.decompose import cp_als, cp_tensorly, decompose_layers, head_svd, tucker2
    from mhacompress.reduction.surgery import reduce_

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=args.layers)).eval()
    attn0 = model.encoder.layer[0].attention.self
    wq, wk = attn0.query.weight.detach().clone(), attn0.key.weight.detach().clone()

    start = time.perf_counter()
    block = reduce_(model, ReductionConfig(key_dim=args.key_dim, method="cp"))
    total = time.perf_counter() - start
    errors = [x["relative_error"] for x in block["layers"]]
    iters = [x["n_iter"] for x in block["layers"]]

    rows = [("mhacompress cp (structured ALS, svd init, defaults), all layers, reduce_", total, float(np.mean(errors)),
             f"{min(iters)}-{max(iters)} iters")]
    torch.manual_seed(0)
    fresh = BertModel(BertConfig(num_hidden_layers=args.layers)).eval()
    layers = [(x.attention.self.query.weight.detach(), x.attention.self.key.weight.detach())
              for x in fresh.encoder.layer]
    start = time.perf_counter()
    batched = decompose_layers(layers, 12, args.key_dim, "cp")
    rows.append(("mhacompress cp, all layers, decompose_layers (one worker per core)", time.perf_counter() - start,
                 float(np.mean([f.relative_error for f in batched])), "same factors"))
    for name, fn in [
        ("mhacompress cp, layer 0, 100 iterations", lambda: cp_als(wq, wk, 12, args.key_dim, n_iter_max=100, tol=0)),
        ("mhacompress tucker, layer 0", lambda: tucker2(wq, wk, 12, args.key_dim)),
        ("mhacompress svd (per head), layer 0", lambda: head_svd(wq, wk, 12, args.key_dim)),
    ]:
        t = time.perf_counter()
        f = fn()
        rows.append((name, time.perf_counter() - t, f.relative_error, f"{f.n_iter} iters"))
    rows.insert(2, ("mhacompress cp (defaults), layer 0", total / args.layers, errors[0], f"{iters[0]} iters"))

    if not args.skip_tensorly:
        t = time.perf_counter()
        ref = cp_tensorly(wq, wk, 12, args.key_dim, init="random", n_iter_max=100, random_state=0, tol=0)
        rows.append(("tensorly parafac on dense T, layer 0 (cp_tensorly: random init, 100 iters)",
                     time.perf_counter() - t, ref.relative_error, f"{ref.n_iter} iters"))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; hidden 768, 12 heads, key dim {args.key_dim}\n")
    print("| run | seconds | relative error | note |\n|---|---:|---:|---|")
    for name, seconds, err, note in rows:
        print(f"| {name} | {seconds:.2f} | {err:.4f} | {note} |")


if __name__ == "__main__":
    main()
