"""Reproduce docs/results.md and docs/results.png: GLUE scores of the bundled MiniLM, original and reduced.

(a) STS-B dev (no fine-tuning: cosine of mean-pooled embeddings) at key dims 384 (exact), 192, 96, 48, 24 for cp,
    tucker and svd.
(b) MiniLM fine-tuned (mhacompress.eval.finetune, what `mhacompress finetune` runs) on MRPC, RTE, CoLA, STS-B and
    SST-2, then reduced with cp at 384, 192, 96, 48: scores without retraining from the weights alone, and after a
    short fine-tune of the reduced model.
(c) The ablation ladder of the label-free, data-aware reduction (no labels, no retraining; `mhacompress.compress`,
    what `mhacompress reduce` runs), one rung per row, each cell with its cost in seconds: on the fine-tuned models
    (calibrated on the task's own train sentences) and on the sentence encoder (calibrated on MRPC's sentences, scored
    on STS-B dev and, as a second metric no setting was tuned on, on the STS-B TRAIN pairs zero-shot).

Fine-tuned checkpoints and per-run scores are cached under ~/.cache/mhacompress/glue_results (never in the repo), so
an interrupted run resumes. Usage:

    python benchmarks/glue_results.py                      # full run (see the timing at the end of docs/results.md)
    python benchmarks/glue_results.py --quick              # tiny smoke run, writes to /tmp
    python benchmarks/glue_results.py --parts c --device cuda --tasks mrpc --no-encoder --cache DIR
                                     # one model's ladder on a GPU; run one process per model, each with its own
                                     # --cache, merge the scores.json files, then `--parts c --write-only`
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")  # the paper's column order (tasks we can train on CPU)
KEEP = "<!-- Everything below this line is written by hand and kept when the script rewrites the file. -->"
RUNGS = ("weights", "calibrated", "sequential", "output", "compensation", "allocation", "refinement", "default")
RUNG_LABEL = {"weights": "weights only", "calibrated": "calibrated (whitened, all layers at once)",
              "sequential": "+ sequential (score objective)", "output": "+ output objective",
              "compensation": "+ compensation (`--uniform --refine 0`)", "allocation": "+ allocation (`--allocate`)",
              "refinement": "+ refinement (`--refine 200`)", "default": "default path (`-k K --calibrate SOURCE`)"}
LABEL = {"cola": "CoLA (mcc)", "sst2": "SST-2 (acc)", "mrpc": "MRPC (F1)", "stsb": "STS-B (spearman)",
         "rte": "RTE (acc)"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue")))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "mhacompress" / "glue_results"))
    p.add_argument("--train-limit", type=int, default=4000,
                   help="train examples per task (seeded sample; all of MRPC and RTE)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=30, help="ALS sweeps of the reductions in part (b)")
    p.add_argument("--retrain-limit", type=int, default=1000, help="examples of the short fine-tune after reduction")
    p.add_argument("--retrain-lr", type=float, default=2e-5)
    p.add_argument("--cal-samples", type=int, default=512, help="train sequences to calibrate on (part c)")
    p.add_argument("--ladder-dims", default="96,48,192", help="key dims of part (c), in run order")
    p.add_argument("--rungs", default=",".join(RUNGS), help="rungs of part (c), in run order")
    p.add_argument("--encoder-source", default="mrpc", help="calibration sentences of the encoder in part (c)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dims", default="192,96,48,384", help="run order (384, exact, last); the table sorts them")
    p.add_argument("--stsb-dims", default="384,192,96,48,24")
    p.add_argument("--tasks", default="sst2,cola,mrpc,rte,stsb", help="run order (cheapest first)")
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, output under /tmp")
    p.add_argument("--parts", default="a,b,c", help="which parts to run; with only c, the ladder section of --out "
                   "is replaced and the rest of the file kept")
    p.add_argument("--write-only", action="store_true", help="write the report from the cached scores, run nothing")
    p.add_argument("--device", default="cpu", help="where fine-tuning, reduction and scoring run (cpu, cuda, ...); "
                   "each ladder cell records the machine its seconds were measured on")
    p.add_argument("--no-encoder", action="store_true", help="part (c) without the sentence encoder's cells (to "
                   "run the models of the ladder in separate processes, each with its own --cache, then merge)")
    args = p.parse_args()
    if args.quick:
        args.train_limit, args.retrain_limit, args.epochs = 64, 32, 1
        args.dims, args.stsb_dims, args.tasks = "384,48", "384,48", "mrpc,stsb"
        args.ladder_dims, args.cal_samples = "48", 32
        args.cache, args.out = "/tmp/mhacompress-quick/cache", "/tmp/mhacompress-quick/results.md"
    return args


class Cache:
    """Scores by key in one JSON file, written after every entry (resume after an interruption)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key, compute):
        if key not in self.data:
            t0 = time.perf_counter()
            self.data[key] = compute()
            entry = self.data[key]
            shown = {k: v for k, v in entry.items() if k != "preds"} if isinstance(entry, dict) else entry
            print(f"{key}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def reduced(model, dim, method="cp", n_iter_max=100, moments=None):
    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.surgery import reduce_

    reduce_(model, ReductionConfig(key_dim=dim, method=method, n_iter_max=n_iter_max), moments=moments)
    return model


def rung_config(rung: str, dim: int, source: str, samples: int, model):
    """The ReductionConfig of one rung of the ladder at key dim ``dim`` (allocation: per-layer dims under the Q/K
    parameters of ``dim`` everywhere; refinement: then 200 Adam steps per layer; default: what `reduce -k DIM
    --calibrate SOURCE` does, decided for the model)."""
    from mhacompress.reduction.config import Calibration, ReductionConfig

    if rung == "weights":
        return ReductionConfig(key_dim=dim)
    if rung == "default":
        return ReductionConfig(key_dim=dim, calibration=Calibration(source, samples=samples))
    closed = dict(refine_steps=0)  # every rung but the last is the closed form alone, whatever the key dim
    kinds = {"calibrated": dict(sequential=False), "sequential": dict(objective="score", compensate=False, **closed),
             "output": dict(objective="output", compensate=False, **closed), "compensation": closed,
             "allocation": closed, "refinement": dict(refine_steps=200)}
    calibration = Calibration(source, samples=samples, **kinds[rung])
    return ReductionConfig(key_dim=dim, calibration=calibration, allocate=rung in ("allocation", "refinement"))


def ladder_cell(args, folder: str, rung: str, dim: int, source: str, scorers: dict) -> dict:
    """One rung at one key dim: every metric of every scorer, the key dims chosen, and the seconds of the
    reduction itself (loading the checkpoint and scoring not included)."""
    from mhacompress import compress
    from mhacompress.bench import _synchronizer
    from mhacompress.hub import load_pretrained

    model, tok, _ = load_pretrained(folder, device=args.device)
    config = rung_config(rung, dim, source, args.cal_samples, model)
    t0 = time.perf_counter()
    result = compress(model, config, tokenizer=tok, data_dir=args.data_dir)
    _synchronizer(args.device)()  # the device's queued work is part of the reduction's time
    seconds = time.perf_counter() - t0
    return {**scored(scorers, result.model, tok), "seconds": round(seconds, 1), "key_dims": result.report["key_dims"],
            "machine": machine(args.device)}


def scored(scorers: dict, model, tok) -> dict:
    """Every metric of every scorer, and the predictions they were computed from (for the drops' bootstrap
    intervals: ``preds`` per split)."""
    scores, preds = {}, {}
    for name, scorer in scorers.items():
        scores[name] = scorer(model, tok)
        preds[name] = scorer.last.preds
    return {"scores": scores, "preds": preds}


def machine(device: str) -> str:
    """What a cell's seconds were measured on: the GPU's name, or the CPU threads the process computes with (not the
    machine's cores: processes run side by side are each given a share)."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} GPU"
    return f"CPU, {torch.get_num_threads()} of {os.cpu_count()} cores"


def part_c(args, cache):
    """The ladder: {(task, rung, dim): cell} with task "encoder" for the sentence encoder."""
    from mhacompress.eval.compare import Scorer
    from mhacompress.hub import load_pretrained

    cells = {}
    dims = list(map(int, args.ladder_dims.split(",")))
    rungs = args.rungs.split(",")
    on = dict(data_dir=args.data_dir, max_length=args.max_length, device=args.device)
    dev = Scorer.for_task("stsb", **on)
    train = Scorer.for_task("stsb", "train", **on)
    encoder = {"dev": dev, "train": train}
    if not args.no_encoder:
        cells[("encoder", "original")] = cache.get("c/encoder/original", lambda: scored(
            encoder, *load_pretrained("minilm", device=args.device)[:2]))
    tag = f"n{args.train_limit}-e{args.epochs:g}-lr{args.lr:g}-b{args.batch_size}"
    tasks = {}
    for task in filter(None, args.tasks.split(",")):
        folder = None if args.write_only else finetuned(args, task)
        scorers = {"dev": Scorer.for_task(task, **on)}
        tasks[task] = folder, scorers
        cells[(task, "original")] = cache.get(f"c/{tag}/{task}/original", lambda folder=folder, scorers=scorers:
                                              scored(scorers, *load_pretrained(folder, device=args.device)[:2]))
    for dim in dims:  # key dim outermost: an interrupted run has whole tables
        # the default path is one of the rungs, as decided for a model read at every token (the encoder) ...
        same = {rung: _same_as(rung, dim, rungs, first_token=False) for rung in rungs}
        for rung in [] if args.no_encoder else rungs:
            key = f"c/encoder/{args.encoder_source}{args.cal_samples}/{same[rung]}/{dim}"
            cells[("encoder", rung, dim)] = cache.get(key, lambda rung=same[rung], dim=dim: ladder_cell(
                args, "minilm", rung, dim, args.encoder_source, encoder))
        same = {rung: _same_as(rung, dim, rungs, first_token=True) for rung in rungs}  # ... or at its first token
        for task, (folder, scorers) in tasks.items():
            for rung in rungs:
                key = f"c/{tag}/{task}/cal{args.cal_samples}/{same[rung]}/{dim}"
                cells[(task, rung, dim)] = cache.get(key, lambda rung=same[rung], dim=dim, folder=folder, task=task,
                                                     scorers=scorers: ladder_cell(args, folder, rung, dim, task,
                                                                                  scorers))
    return cells


def _same_as(rung: str, dim: int, rungs: list[str], first_token: bool) -> str:
    """The rung whose cells ``rung`` shares at ``dim``: the first that reduces the bundled MiniLM's shape the same
    way, as decided for it, read at the ``first_token`` (the classifiers) or at every token (the encoder): the
    default path is the compensated rung at d/2, and at d/8 the refined one for the classifiers."""
    def decided(r):
        return rung_config(r, dim, "source", 512, None).decided(MINILM_WIDTH, MINILM_LAYERS, first_token)

    return next((r for r in rungs if r != "default" and decided(r) == decided(rung)), rung)


def part_a(args, cache):
    from mhacompress.eval.compare import Scorer
    from mhacompress.hub import load_pretrained

    scorer = Scorer.for_task("stsb", data_dir=args.data_dir, max_length=args.max_length)
    rows = {"original": cache.get("a/original", lambda: scorer(*load_pretrained("minilm")[:2])["spearman"])}
    for method in ("cp", "tucker", "svd"):
        for dim in map(int, args.stsb_dims.split(",")):
            def run(method=method, dim=dim):
                model, tok, _ = load_pretrained("minilm")
                return scorer(reduced(model, dim, method), tok)["spearman"]
            rows[f"{method}/{dim}"] = cache.get(f"a/{method}/{dim}", run)
    return rows


def finetuned(args, task):
    """The fine-tuned MiniLM for ``task``: from the cache folder, or trained now and saved there."""
    from mhacompress.eval.data import load_examples
    from mhacompress.eval.finetune import train, with_head
    from mhacompress.eval.tasks import get_task
    from mhacompress.hub import load_pretrained, save

    folder = Path(args.cache) / f"minilm-{task}-n{args.train_limit}-e{args.epochs:g}-lr{args.lr:g}-b{args.batch_size}"
    if not (folder / "config.json").is_file():
        spec = get_task(task)
        model, tok, _ = load_pretrained("minilm")
        model = with_head(model, spec)
        data = load_examples(spec, "train", data_dir=args.data_dir, limit=args.train_limit, seed=0)
        t0 = time.perf_counter()
        log = train(model, tok, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    max_length=args.max_length, device=args.device)
        print(f"fine-tuned {task} on {len(data)} examples, {log['steps']} steps, {time.perf_counter() - t0:.0f} s, "
              f"loss {_mean(log['losses'][:10]):.3f} -> {_mean(log['losses'][-10:]):.3f}", flush=True)
        save(model.cpu(), tok, folder, force=True)
    return str(folder)


def _mean(xs):
    return sum(xs) / len(xs)


def part_b(args, cache):
    from mhacompress.eval.compare import Scorer
    from mhacompress.eval.data import load_examples
    from mhacompress.eval.finetune import train
    from mhacompress.eval.tasks import get_task
    from mhacompress.hub import load_pretrained

    rows = {}
    tag = f"n{args.train_limit}-e{args.epochs:g}-lr{args.lr:g}-b{args.batch_size}-it{args.iterations}"
    for task in args.tasks.split(","):
        spec = get_task(task)
        folder = None if args.write_only else finetuned(args, task)
        scorer = Scorer.for_task(task, data_dir=args.data_dir, max_length=args.max_length)
        rows[("original", task)] = cache.get(f"b/{tag}/{task}/original",
                                             lambda: scorer(*load_pretrained(folder)[:2])[spec.main])
        retrain = load_examples(spec, "train", data_dir=args.data_dir, limit=args.retrain_limit, seed=1)
        for dim in map(int, args.dims.split(",")):
            def both(dim=dim):  # one reduction: scored as is, then after a short fine-tune
                model, tok, _ = load_pretrained(folder)
                plain = scorer(reduced(model, dim, n_iter_max=args.iterations), tok)[spec.main]
                train(model, tok, retrain, epochs=1, lr=args.retrain_lr, batch_size=args.batch_size,
                      max_length=args.max_length)
                return {"plain": plain, "ft": scorer(model, tok)[spec.main]}
            r = cache.get(f"b/{tag}/{task}/cp{dim}/ft{args.retrain_limit}-lr{args.retrain_lr:g}", both) or {}
            rows[(dim, task)], rows[(f"{dim}+ft", task)] = r.get("plain"), r.get("ft")
    return rows


def write(args, a, b, c, seconds):
    tasks = [t for t in TASKS if t in args.tasks.split(",")]  # paper column order, whatever order they ran in
    dims = sorted(map(int, args.dims.split(",")), reverse=True)
    out = Path(args.out)
    lines = ["# Results", "",
             "Generated by `python benchmarks/glue_results.py` (scores cached under ~/.cache/mhacompress; "
             "`--write-only` rewrites this file from them). Scores are "
             "on the GLUE dev sets, x100. Method: `cp` (collaborative heads) unless stated; no retraining unless "
             "stated. Model: the bundled all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384; key dim 384 is exact).",
             "", "## STS-B without fine-tuning", "",
             "Spearman of the cosine similarity of mean-pooled embeddings (the sentence-transformers convention), "
             "full dev set (1,500 pairs).", "",
             "| key dim | cp | tucker | svd |", "|---:|---:|---:|---:|",
             f"| original | {100 * a['original']:.1f} | {100 * a['original']:.1f} | {100 * a['original']:.1f} |"]
    for dim in map(int, args.stsb_dims.split(",")):
        lines.append(f"| {dim} | " + " | ".join(_pct(a.get(f"{m}/{dim}")) for m in ("cp", "tucker", "svd")) + " |")
    lines += ["", "## Fine-tuned MiniLM, reduced after fine-tuning", "",
              f"MiniLM fine-tuned per task (`mhacompress finetune`) on a seeded random sample of up to "
              f"{args.train_limit:,} train examples (a CPU budget: CoLA has 8,551, SST-2 67,349, STS-B 5,749; "
              f"MRPC's 3,668 and RTE's 2,490 are used whole), "
              f"{args.epochs:g} epochs, AdamW lr {args.lr:g}, linear warm-up 10% and decay, batch {args.batch_size}, "
              f"max length {args.max_length}. Then reduced with cp ({args.iterations} ALS sweeps) from the weights "
              f"alone at each key dim: `k` rows are scores without retraining (for the data-aware reduction see the "
              f"ladder below), `k + ft` rows the same reduction after one "
              f"epoch of fine-tuning on a fresh seeded sample of {args.retrain_limit:,} train examples (lr "
              f"{args.retrain_lr:g}). Main metric per task; Avg. is their mean.", "",
              "| key dim | " + " | ".join(LABEL[t] for t in tasks) + " | Avg. |",
              "|---|" + "---:|" * (len(tasks) + 1)]
    for row in ["original"] + [r for d in dims for r in (d, f"{d}+ft")]:
        vals = [b.get((row, t)) for t in tasks]
        avg = sum(vals) / len(vals) if None not in vals else None
        name = str(row).replace("+ft", " + ft").replace("+cal", " cal")
        lines.append(f"| {name} | " + " | ".join(map(_pct, vals)) + f" | {_pct(avg)} |")
    lines += ["", "Read with care: the fine-tuning budget (minutes per task on a 2-core CPU) leaves absolute scores "
              "below MiniLM's published GLUE results; a dash marks a run that did not finish. Rerun with larger "
              "`--train-limit`, `--epochs` and `--retrain-limit` where compute allows.", "",
              f"![scores against key dim]({out.with_suffix('.png').name})", ""]
    lines += ladder_lines(args, c)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = out.read_text().partition(KEEP)[2] if out.is_file() else ""
    out.write_text("\n".join(lines) + "\n" + KEEP + kept)
    plot(args, a, b, out.with_suffix(".png"), tasks, dims)
    print(f"wrote {out} and {out.with_suffix('.png')}")


MINILM_WIDTH, MINILM_LAYERS = 384, 6  # the bundled MiniLM's H * dh and layers: what the default path decides from
MAIN = {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "stsb": "spearman", "rte": "accuracy"}


def ladder_lines(args, c) -> list[str]:
    """Part (c) as markdown: one table per key dim, a row per rung, a column per task (cells: score, seconds)."""
    tasks = [t for t in TASKS if t in args.tasks.split(",")]
    rungs = [r for r in RUNGS if r in args.rungs.split(",")]

    def score(task, cell, metric, split="dev"):
        return None if not cell else cell["scores"][split].get(metric)

    def orig(task, metric, split="dev"):
        return score(task, c.get((task, "original")), metric, split)

    lines = [LADDER, "",
             "Every rung adds one step to the one above; none uses labels or retraining. `calibrated`: each layer "
             "whitened by its input second moments, all layers from the original's inputs; `+ sequential`: bottom-up, "
             "each layer fitted on the inputs the reduced layers below produce, to the original's scores; `+ output "
             "objective`: fitted to the layer's attention OUTPUT (centred, head- and token-weighted); `+ "
             "compensation`: the attention output projection refitted by ridge least squares, every layer at the key "
             "dim (what `reduce -k K --calibrate SOURCE` does for K > d/4); `+ allocation`: the same Q/K parameters "
             "as the uniform key dim, spread over the layers by the measured effect on the model's output "
             "(`--allocate`); `+ refinement`: then 200 Adam steps per layer on the same target, where no closed form "
             "exists (`--refine 200`). `default path`: what `reduce -k K --calibrate SOURCE` does, as decided for "
             "this model: for K <= d/8 allocated and refined; for K <= d/4, on a model as small as this one (not on "
             "BERT-base, where either costs more than the rest of the reduction), a classifier allocated in closed "
             "form and the encoder uniform and refined; refined with 200 steps for the classifiers and 400 for the "
             "encoder, read at every token; uniform closed form above (`--uniform`, `--allocate`, `--refine N` "
             "override). Where it is one of the rungs above, the row repeats that rung's cells. Each drop quoted "
             "from these tables has a 95% paired bootstrap interval a few points wide on the smaller dev sets (MRPC "
             "408 pairs, RTE 277: `reduce --eval` reports it). Calibration: "
             f"{args.cal_samples} unlabelled sequences; fine-tuned models on their task's train split, the encoder on "
             f"{args.encoder_source.upper()}'s sentences. Each cell: the score x100, then the seconds of the "
             f"reduction ({_machines(c)}; loading and scoring not counted). MRPC shows F1 / accuracy (F1 alone hides a "
             "model that answers 'paraphrase' to everything: it scores F1 81.2).", ""]
    label = {**LABEL, "mrpc": "MRPC (F1 / acc)"}
    head = ["rung"] + [label[t] for t in tasks] + ["Avg. drop", "STS-B dev (encoder)", "STS-B train (encoder)"]
    for dim in sorted(map(int, args.ladder_dims.split(",")), reverse=True):
        lines += [f"### key dim {dim}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        row = ["original"] + [_pct(orig(t, MAIN[t])) + (f" / {_pct(orig(t, 'accuracy'))}" if t == "mrpc" else "")
                              for t in tasks]
        row += [""] + [f"{100 * v:.2f}" if v is not None else "–"
                       for v in (orig("encoder", "spearman"), orig("encoder", "spearman", "train"))]
        lines.append("| " + " | ".join(row) + " |")
        for rung in rungs:
            row, drops = [RUNG_LABEL[rung]], []
            for t in tasks:
                cell = c.get((t, rung, dim))
                v = score(t, cell, MAIN[t])
                drops.append(None if v is None or orig(t, MAIN[t]) is None else orig(t, MAIN[t]) - v)
                text = _pct(v) + (f" / {_pct(score(t, cell, 'accuracy'))}" if t == "mrpc" else "")
                row.append(text + (f" ({cell['seconds']:.0f} s)" if cell else ""))
            row.append("–" if None in drops or not drops else f"{100 * sum(drops) / len(drops):.2f}")
            enc = c.get(("encoder", rung, dim))
            row += [f"{100 * score('encoder', enc, 'spearman', s):.2f}" if enc else "–" for s in ("dev", "train")]
            row[-2] += f" ({enc['seconds']:.0f} s)" if enc else ""
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", _summary(c, tasks, dim, "default", score, orig, args.data_dir), ""]
    return lines


def _machines(c) -> str:
    """Where the cells' seconds were measured (cells from before machines were recorded: a 2-core CPU)."""
    found = {cell.get("machine", "2-core CPU") for key, cell in c.items() if len(key) == 3 and cell}
    return " and ".join(sorted(found)) or "not run"


def _summary(c, tasks, dim, rung, score, orig, data_dir=None) -> str:
    """One line on the default path at ``dim``: average drop, the task that keeps least of its score, MRPC's drops,
    the encoder's drops on both metrics."""
    cells = {t: c.get((t, rung, dim)) for t in tasks + ["encoder"]}
    if not tasks or any(v is None for v in cells.values()):
        return f"(the {rung} rung is not finished at key dim {dim})"
    drops = {t: orig(t, MAIN[t]) - score(t, cells[t], MAIN[t]) for t in tasks}
    kept = {t: score(t, cells[t], MAIN[t]) / orig(t, MAIN[t]) for t in tasks if orig(t, MAIN[t]) > 0}
    low = min(kept, key=kept.get)
    enc = [orig("encoder", "spearman", s) - score("encoder", cells["encoder"], "spearman", s) for s in ("dev", "train")]
    mrpc = ""
    if "mrpc" in tasks:
        mrpc = (f"; MRPC F1 / accuracy drop {100 * drops['mrpc']:.2f}{_interval(c, cells['mrpc'], 'f1', data_dir)} / "
                f"{100 * (orig('mrpc', 'accuracy') - score('mrpc', cells['mrpc'], 'accuracy')):.2f}"
                f"{_interval(c, cells['mrpc'], 'accuracy', data_dir)}")
    config = rung_config(rung, dim, "source", 512, None)
    decided = config.decided(MINILM_WIDTH, MINILM_LAYERS, first_token=True)
    steps = decided.calibration.refine_steps
    encoder = config.decided(MINILM_WIDTH, MINILM_LAYERS).calibration.refine_steps  # read at every token
    how = ("allocated" if decided.allocate else "uniform") + (f", {steps} refinement steps" if steps else
                                                              ", closed form")
    how += f"; {encoder} for the encoder" if encoder != steps else ""
    spread = lambda split: _interval(c, cells["encoder"], "spearman", data_dir, "encoder", split, scale=1)  # noqa: E731
    return (f"Default path (`-k {dim} --calibrate`, {how}): average drop {100 * sum(drops.values()) / len(drops):.2f} "
            f"points; the lowest share of an original score is {100 * kept[low]:.1f}% ({LABEL[low]}){mrpc}; encoder "
            f"Spearman drop {enc[0]:.4f}{spread('dev')} on STS-B dev and {enc[1]:.4f}{spread('train')} on STS-B train.")


def _interval(c, cell, metric: str, data_dir, task: str = "mrpc", split: str = "dev", scale: int = 100) -> str:
    """' [low, high]': the 95% paired bootstrap interval (x ``scale``) of ``cell``'s drop on ``task``'s ``split``
    (the encoder's: STS-B's), from the predictions cached beside the scores ('' for cells cached before they were)."""
    from mhacompress.eval.data import load_examples
    from mhacompress.eval.metrics import drop_interval

    original = c.get((task, "original")) or {}
    if split not in original.get("preds", {}) or split not in cell.get("preds", {}):
        return ""
    glue_split = {"dev": "validation"}.get(split, split)
    labels = load_examples("stsb" if task == "encoder" else task, glue_split, data_dir=data_dir).labels
    interval = drop_interval(metric, original["preds"][split], cell["preds"][split], labels)
    digits = 2 if scale == 100 else 4
    return "" if interval is None else f" [{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"


LADDER = "## Keeping the scores without retraining: the ablation ladder"


def write_ladder(args, c) -> None:
    """Replace the ladder section of ``args.out`` (up to the next top-level section or the hand-written part)."""
    out = Path(args.out)
    text = out.read_text() if out.is_file() else ""
    generated, _, kept = text.partition(KEEP)
    before, _, after = generated.partition(LADDER)
    rest = after.partition("\n## ")[2]
    body = before.rstrip("\n") + "\n\n" + "\n".join(ladder_lines(args, c)) + ("\n## " + rest if rest else "\n")
    out.write_text(body + KEEP + kept)
    print(f"wrote the ladder into {out}")


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x):
    return float("nan") if x is None else 100 * x


def plot(args, a, b, path, tasks, dims):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    stsb_dims = list(map(int, args.stsb_dims.split(",")))
    for m in ("cp", "tucker", "svd"):
        left.plot(stsb_dims, [_num(a.get(f"{m}/{d}")) for d in stsb_dims], marker="o", label=m)
    left.axhline(100 * a["original"], color="grey", ls="--", label="original")
    left.set(xscale="log", xlabel="key dim", ylabel="Spearman x100", title="STS-B, no fine-tuning")
    rows = ["original"] + [r for d in dims for r in (d, f"{d}+ft")]
    tasks = [t for t in tasks if all(b.get((r, t)) is not None for r in rows)] or tasks  # the finished ones
    avg = lambda row: sum(_num(b.get((row, t))) for t in tasks) / len(tasks)  # noqa: E731
    right.plot(dims, [avg(d) for d in dims], marker="o", label="cp, no retraining")
    right.plot(dims, [avg(f"{d}+ft") for d in dims], marker="s", label="cp + short fine-tune")
    right.axhline(avg("original"), color="grey", ls="--", label="original")
    right.set(xscale="log", xlabel="key dim", ylabel="GLUE average x100",
              title="Fine-tuned MiniLM, mean of " + ", ".join(tasks))
    for ax in (left, right):
        ax.set_xticks(stsb_dims if ax is left else dims, [str(d) for d in (stsb_dims if ax is left else dims)])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    start = time.perf_counter()
    cache = Cache(Path(args.cache) / "scores.json")
    if args.write_only:
        cache.get = lambda key, compute: cache.data.get(key)
    if args.parts == "c":
        write_ladder(args, part_c(args, cache))
        return
    a = part_a(args, cache)
    b = part_b(args, cache)
    c = part_c(args, cache)
    write(args, a, b, c, time.perf_counter() - start)


if __name__ == "__main__":
    main()
