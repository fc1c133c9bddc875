"""One refinement step (forward to the layer's residual sum, backward to the query/key factors) of a reduced layer,
three ways side by side in one run: the whole layer through sdpa, the whole layer by the reference formula, and the
reduction's own step (reduction/sequential.py ``RefinementLoss``: the formula on value heads computed once and read
back from the spill, with the batch's input and target, as ``_refine`` takes it).

The reduction's refinement runs on CPU by the formula (``by_formula``), from cached values; this shows why.
Random-weight BERT-base-size layer (d 768, 12 heads), reduced from its weights at each key dim, on a batch of random
token ids with a quarter of the tokens padded in half the sequences.

    python benchmarks/refine_step.py                      # key dims 48, 96, 192; batch 32 x 64
    python benchmarks/refine_step.py --key-dims 96 --tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key-dims", default="48,96,192")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="interleaved timings per path (median reported)")
    return p.parse_args()


def reduced_layer(key_dim: int):
    """Layer 0 of a one-layer BERT-base-size model reduced at ``key_dim``, its attention module and norm."""
    from transformers import BertConfig, BertModel

    from mhacompress import ReductionConfig, compress
    from mhacompress.reduction.modeling import arch_for, attention_modules
    from mhacompress.reduction.modeling import layers as model_layers

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, attn_implementation="sdpa")).eval()
    compress(model, ReductionConfig(key_dim=key_dim, n_iter_max=5))
    layer = model_layers(model)[0]
    return model, layer, attention_modules(model)[0][2], layer.get_submodule(arch_for(model.config).norm)


def main() -> None:
    from mhacompress.reduction.sequential import Batch, LayerAt, RefinementLoss, Spill, layer_inputs, run_until

    args = parse_args()
    torch.manual_seed(0)
    print(f"batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads; ms per step (median of "
          f"{args.repeats})\n\n| key dim | sdpa | formula | cached values | formula / sdpa | cached / formula |\n"
          f"|---:|---:|---:|---:|---:|---:|")
    for k in [int(x) for x in args.key_dims.split(",")]:
        model, layer, module, norm = reduced_layer(k)
        mask = torch.ones(args.batch, args.tokens, dtype=torch.long)
        mask[::2, -args.tokens // 4:] = 0
        ids = torch.randint(1000, model.config.vocab_size, mask.shape)
        with torch.no_grad():  # the layer's inputs as the reduction captures them
            x, call_args, call_kwargs = layer_inputs(model, {"input_ids": ids, "attention_mask": mask})
        target = torch.randn_like(x)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [module.query_proj.weight, module.key_proj.weight, module.content_bias.weight]
        for p in params:
            p.requires_grad_(True)

        folder = tempfile.TemporaryDirectory()
        spill = Spill(Path(folder.name))
        spill.write("x", 0, x)
        spill.write("s", 0, target)
        spill.write_call(0, call_args, call_kwargs)
        at = LayerAt(layer, module, norm, None)
        cached = RefinementLoss(module, at, [Batch({"attention_mask": mask}, mask.bool())], spill, True,
                                torch.device("cpu"), False)

        def step(path: str) -> float:
            module.by_formula = path != "sdpa"
            start = time.perf_counter()
            if path == "cached":
                cached(0).backward()
            else:
                out = run_until(layer, norm, x, call_args, call_kwargs)
                (out - target)[mask.bool()].pow(2).sum().backward()
            for p in params:
                p.grad = None
            return time.perf_counter() - start

        paths = ("sdpa", "formula", "cached")
        for path in paths:  # warm-up
            step(path)
        times = {path: [] for path in paths}
        for _ in range(args.repeats):
            for path in paths:
                times[path].append(step(path))
        sdpa, formula, cached_ms = (1000 * statistics.median(times[p]) for p in paths)
        print(f"| {k} | {sdpa:.1f} | {formula:.1f} | {cached_ms:.1f} | {formula / sdpa:.2f} | "
              f"{cached_ms / formula:.2f} |")
        folder.cleanup()


if __name__ == "__main__":
    main()
