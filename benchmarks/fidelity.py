"""Label-free fidelity of a reduction on text it was not calibrated on: how far the reduced model's outputs move from
the original's, side by side for settings of the whitening's shrinkage (docs/method.md), in one run.

Scores on a dev set of a few hundred examples move by a point from noise alone (docs/results.md); these distances
average over every example and show a change of method that scores hide, on more than one task and split.

* Sentence encoder (the bundled MiniLM, calibrated on --encoder-source sentences): 1000 x mean (1 - cosine) between
  the original's and the reduced model's normalised mean-pooled embeddings, on sentences of eight text sets of
  different domains and lengths (GLUE train sentences drawn with another seed than the calibration's, QNLI dev
  questions and sentences).
* Fine-tuned classifiers (benchmarks/glue_results.py's checkpoints, calibrated on their task's train split): 1000 x
  the mean KL(original || reduced) of the class distribution on the dev split (mean squared difference of the
  prediction for STS-B's regression head), and the share of dev examples whose predicted class is unchanged.

    python benchmarks/fidelity.py --key-dim 96 --shrink 0,0.3
    python benchmarks/fidelity.py --key-dim 48 --rung refinement --tasks mrpc,stsb,sst2
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

TEXT_SETS = ("stsb", "sst2", "cola", "rte", "mrpc", "wnli")  # train sentences, single (pairs split)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue")))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "mhacompress" / "glue_results"),
                   help="where benchmarks/glue_results.py keeps its fine-tuned checkpoints")
    p.add_argument("--key-dim", type=int, default=96)
    p.add_argument("--rung", default="compensation", help="a rung of glue_results.py's ladder (compensation: the "
                   "closed form, refinement: allocated and refined, default: what reduce -k K --calibrate does)")
    p.add_argument("--shrink", default="0,0.3", help="whitening shrinkages to compare, comma-separated")
    p.add_argument("--samples", type=int, default=512, help="calibration sequences")
    p.add_argument("--encoder-source", default="mrpc", help="calibration source of the encoder ('' to skip it)")
    p.add_argument("--tasks", default="mrpc,stsb,sst2,rte", help="fine-tuned classifiers ('' to skip them)")
    p.add_argument("--sentences", type=int, default=400, help="sentences per text set (encoder)")
    return p.parse_args()


def with_shrinkage(r: float) -> None:
    """The output objective's shrinkage set to ``r`` (objectives.SHRINKAGE, read at every solve)."""
    import mhacompress.reduction.objectives as objectives

    objectives.SHRINKAGE = r


def text_sets(data_dir: str, n: int) -> dict[str, list[str]]:
    from mhacompress.calibration import calibration_texts

    sets = {t: [s for (s,) in calibration_texts(t, n, pairs=False, data_dir=data_dir, seed=7)] for t in TEXT_SETS}
    with open(Path(data_dir) / "QNLI" / "dev.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    random.Random(3).shuffle(rows)
    sets["qnli-q"], sets["qnli-s"] = [r[1] for r in rows[:n]], [r[2] for r in rows[:n]]
    return sets


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 64):
        batch = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = batch.to(model.device)  # (B, T)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def predictions(model, tok, texts: list[tuple[str, ...]]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 64):
        columns = list(zip(*texts[i:i + 64]))
        batch = tok(*columns, padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(model(**batch).logits)
    return torch.cat(out)


def reduce(folder: str, source: str, args):
    from glue_results import rung_config

    from mhacompress import compress
    from mhacompress.hub import load_pretrained

    model, tok, _ = load_pretrained(folder)
    config = rung_config(args.rung, args.key_dim, source, args.samples, model)
    return compress(model, config, tokenizer=tok, data_dir=args.data_dir).model, tok


def encoder_rows(args, shrinks: list[float]) -> list[str]:
    from mhacompress.hub import load_pretrained

    sets = text_sets(args.data_dir, args.sentences)
    model, tok, _ = load_pretrained("minilm")
    reference = {name: embed(model, tok, texts) for name, texts in sets.items()}
    rows = [f"| shrinkage | {' | '.join(sets)} | mean |", "|---:|" + "---:|" * (len(sets) + 1)]
    for r in shrinks:
        with_shrinkage(r)
        reduced, tok = reduce("minilm", args.encoder_source, args)
        dist = [1e3 * float(1 - (embed(reduced, tok, texts) * reference[name]).sum(-1).mean())
                for name, texts in sets.items()]
        rows.append(f"| {r:g} | {' | '.join(f'{x:.2f}' for x in dist)} | {sum(dist) / len(dist):.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def classifier_rows(args, shrinks: list[float]) -> list[str]:
    from mhacompress.eval.data import load_examples
    from mhacompress.eval.tasks import get_task
    from mhacompress.hub import load_pretrained

    rows = ["| task | shrinkage | divergence x 1000 | predictions unchanged |", "|---|---:|---:|---:|"]
    for task in args.tasks.split(","):
        folder = str(Path(args.cache) / f"minilm-{task}-n4000-e3-lr0.0001-b32")
        spec = get_task(task)
        dev = load_examples(spec, "validation", data_dir=args.data_dir).texts
        model, tok, _ = load_pretrained(folder)
        reference = predictions(model, tok, dev)
        for r in shrinks:
            with_shrinkage(r)
            reduced, tok = reduce(folder, task, args)
            logits = predictions(reduced, tok, dev)
            if spec.regression:
                div, same = float((logits - reference).pow(2).mean()), "-"
            else:
                div = float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                                       log_target=True, reduction="batchmean"))
                same = f"{float((logits.argmax(-1) == reference.argmax(-1)).float().mean()):.3f}"
            rows.append(f"| {task} | {r:g} | {1e3 * div:.2f} | {same} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    args = parse_args()
    shrinks = [float(x) for x in args.shrink.split(",")]
    print(f"key dim {args.key_dim}, rung {args.rung}, {args.samples} calibration sequences\n")
    if args.encoder_source:
        print(f"Encoder (calibrated on {args.encoder_source}), 1000 x mean (1 - cosine):\n")
        print("\n".join(encoder_rows(args, shrinks)) + "\n")
    if args.tasks:
        print("Fine-tuned classifiers (calibrated on their train split), on the dev split:\n")
        print("\n".join(classifier_rows(args, shrinks)))


if __name__ == "__main__":
    main()
