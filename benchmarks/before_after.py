"""The bar figures of docs/performance.md for two versions of mhacompress, side by side in one run.

Checks out --before (a git ref, default: the last commit before the issue-9 restructuring) into a temporary
worktree and measures it and this working tree alternately, each measurement in a fresh process with the version
first on PYTHONPATH, --rounds times (medians):

  reduction   BERT-base-sized model (BertConfig defaults, random weights), cp at key dim 384, weights only
  latency     whole forward pass, reduced/original, MiniLM and BERT-base size at batch 1 and 32 x 128 tokens, cp and
              svd at key dims d/4 and d/8 (reduced models with random factors of the right shapes)
  eval        scoring the bundled MiniLM on the 1,500 STS-B dev pairs (`mhacompress eval`'s batching)

    python benchmarks/before_after.py [--before REF] [--rounds 3] [--only reduction,latency,eval]

Prints a markdown table. Needs ../shared/glue (or $MHACOMPRESS_GLUE_DIR) for the eval row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "bbbe6c2"  # main before the pipeline / registry / modelling split (issue 9)

# One measurement, run in a fresh process against whichever version is first on PYTHONPATH. It uses only names that
# both versions have (mhacompress.reduce_, ReductionConfig, hub.load_pretrained, eval.compare.Scorer, and the
# modelling package's attention_modules / collaborate_ under either of its two paths).
PROBE = r'''
import json, statistics, sys, time
import torch
what = sys.argv[1]
try:
    from mhacompress.reduction.modeling import attention_modules, collaborate_
except ImportError:
    from mhacompress.compress.modeling import attention_modules, collaborate_

def timed(fn, repeats):
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times[2:])

def shaped(model, method, key_dim):
    import copy
    reduced = copy.deepcopy(model)
    n = len(attention_modules(reduced))
    collaborate_(reduced, {"method": method, "layers": [{"index": i, "key_dim": key_dim} for i in range(n)]})
    with torch.no_grad():
        for _, _, m in attention_modules(reduced):
            for p in (m.query_proj.weight, m.key_proj.weight, m.content_bias.weight, m.mixing):
                if p is not None:
                    p.normal_(0, 0.05)
    return reduced.eval()

if what == "reduction":
    from transformers import BertConfig, BertModel
    import mhacompress
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    t = time.perf_counter()
    mhacompress.reduce_(model, mhacompress.ReductionConfig(key_dim=384))
    print(json.dumps({"reduction BERT-base size, cp k=384, s": time.perf_counter() - t}))
elif what == "latency":
    from transformers import BertConfig, BertModel
    from mhacompress.hub import load_pretrained
    minilm = load_pretrained("minilm", attn_implementation="sdpa")[0].eval()
    torch.manual_seed(0)
    base = BertModel(BertConfig(attn_implementation="sdpa")).eval()
    out = {}
    for name, model in (("MiniLM", minilm), ("BERT-base size", base)):
        d = model.config.hidden_size
        for batch in (1, 32):
            if name == "BERT-base size" and batch == 32:
                continue  # 358 GMACs a pass: minutes per cell on 2 cores
            ids = torch.randint(1, model.config.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            repeats = 15 if batch == 1 else 5
            original = timed(lambda: model(**inputs), repeats)
            for method, f in (("cp", 4), ("cp", 8), ("svd", 4), ("svd", 8)):
                reduced = shaped(model, method, d // f)
                out[f"latency {name} {batch}x128 {method} d/{f}"] = timed(lambda: reduced(**inputs), repeats) / original
    print(json.dumps(out))
elif what == "eval":
    import os
    from mhacompress.eval.compare import Scorer
    from mhacompress.hub import load_pretrained
    model, tok, _ = load_pretrained("minilm")
    scorer = Scorer.for_task("stsb", data_dir=os.environ["MHACOMPRESS_GLUE_DIR"])
    t = time.perf_counter()
    scores = scorer(model, tok)
    print(json.dumps({"eval MiniLM STS-B dev, s": time.perf_counter() - t, "_spearman": scores["spearman"]}))
'''


def run(tree: Path, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, what], cwd=tree, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help="git ref of the earlier version")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="reduction,latency,eval")
    args = p.parse_args()
    os.environ.setdefault("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue"))
    with tempfile.TemporaryDirectory(prefix="mhacompress-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
            for _ in range(args.rounds):
                for what in args.only.split(","):
                    for side, tree in (("before", before), ("after", REPO)):  # alternate: load hits both alike
                        for key, value in run(tree, what).items():
                            samples[side].setdefault(key, []).append(value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"medians of {args.rounds} rounds, each in a fresh process; before = {args.before}, after = working tree\n")
    print("| figure | before | after | after/before |\n|---|---:|---:|---:|")
    for key in samples["after"]:
        if key.startswith("_"):
            continue
        b, a = statistics.median(samples["before"][key]), statistics.median(samples["after"][key])
        print(f"| {key} | {b:.3f} | {a:.3f} | {a / b:.2f} |")
    if "_spearman" in samples["after"]:
        print(f"\nSTS-B dev Spearman: before {samples['before']['_spearman'][0]:.4f}, "
              f"after {samples['after']['_spearman'][0]:.4f} (must be equal)")


if __name__ == "__main__":
    main()
