"""Peak memory and wall time of `mhacompress reduce` on large random-weight checkpoints.

Builds random-weight checkpoints saved as safetensors (BERT-base size, bert-large size: 24 layers x 1024, 16 heads,
and XLM-R-large size: the same with a 250,002-token vocabulary), each with a tokenizer (the bundled MiniLM's for
the BERT sizes; for XLM-R a unigram tokenizer with the full 250,002-entry vocabulary, built offline), then runs
`mhacompress reduce DIR --key-dim d/4 --output OUT` in a child process, weights only and with
`--calibrate mrpc --samples 512` (GLUE from $MHACOMPRESS_GLUE_DIR, default ../shared/glue), and reports parameters,
checkpoint MB, the child's peak RSS (from wait4), RSS / checkpoint and seconds as a markdown table.

Targets (issue 12): peak RSS <= 1.5x the checkpoint weights-only, <= 2x calibrated. Modes: weights only; calibrated
(`--calibrate mrpc`, the default data-aware path as a user runs it: at d/4 it keeps d/4 in every layer, since
per-layer allocation and refinement are the default only from d/8 down); uniform (the same with `--uniform`, for key
dims where the default allocates); closed (the same with `--refine 0`). `--divisor 8` runs at d/8 instead of d/4.

    python benchmarks/memory.py                                   # all sizes, all modes (30-60 minutes on 2 cores)
    python benchmarks/memory.py --sizes base,large --modes weights
    python benchmarks/memory.py --workdir /tmp/ckpts              # keep (and reuse) the checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # name -> (model_type, config overrides, key dim)
    "base": ("bert", {}, 192),
    "large": ("bert", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096}, 256),
    "xlmr-large": ("xlm-roberta", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                   "intermediate_size": 4096, "vocab_size": 250002, "max_position_embeddings": 514,
                                   "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0,
                                   "eos_token_id": 2}, 256),
}
LABELS = {"base": "BERT-base size", "large": "bert-large size", "xlmr-large": "XLM-R-large size"}
CLI = "from mhacompress.cli import main; main()"  # works with the current mhacompress.cli:main


def build_checkpoint(size: str, folder: Path) -> None:
    """A random-weight checkpoint (safetensors) with a tokenizer, in ``folder`` (skipped when already there)."""
    if (folder / "model.safetensors").is_file():
        return
    code = f"import runpy; runpy.run_path({__file__!r})['_build']({size!r}, {str(folder)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)  # its memory is given back on exit


def _build(size: str, folder: str) -> None:
    import torch
    import transformers

    model_type, overrides, _ = SIZES[size]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **overrides)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer(model_type, config.vocab_size).save_pretrained(folder)


def _tokenizer(model_type: str, vocab_size: int):
    from transformers import AutoTokenizer

    from mhacompress.hub import bundled_model_path

    minilm = AutoTokenizer.from_pretrained(bundled_model_path())
    if model_type == "bert":
        return minilm
    return _unigram_tokenizer(minilm, vocab_size)


def _unigram_tokenizer(minilm, vocab_size: int):
    """An XLM-R-style sentencepiece-unigram tokenizer with exactly ``vocab_size`` entries: XLM-R's four specials,
    MiniLM's word pieces as '▁word' pieces, single characters, and filler pieces (never produced) up to the size,
    <mask> last."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import XLMRobertaTokenizerFast

    words = [w for w in minilm.get_vocab() if not w.startswith("[") and not w.startswith("##")]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = list(dict.fromkeys(["<s>", "<pad>", "</s>", "<unk>"] + [f"▁{w}" for w in words + chars] + chars))
    pieces += [f"▁filler{i}" for i in range(vocab_size - 1 - len(pieces))] + ["<mask>"]
    vocab = [(p, 0.0 if i < 4 else -float(len(p))) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


MODES = {"weights": [], "calibrated": ["--calibrate", "mrpc"], "uniform": ["--calibrate", "mrpc", "--uniform"],
         "closed": ["--calibrate", "mrpc", "--refine", "0"]}


def run_reduce(folder: Path, key_dim: int, mode: str, out: Path, samples: int) -> dict:
    """One `mhacompress reduce` in a child process: its wall seconds, peak RSS (MB) and JSON report."""
    args = ["reduce", str(folder), "--key-dim", str(key_dim), "--output", str(out), "--force", "--json"]
    args += MODES[mode] + (["--samples", str(samples)] if MODES[mode] else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("MHACOMPRESS_GLUE_DIR", str(REPO.parent / "shared" / "glue"))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (ru_maxrss, KB on Linux)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"reduce failed ({child.returncode}): {stderr.read().strip()[-2000:]}")
        return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "report": json.loads(stdout.read())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--modes", default="weights,calibrated,uniform",
                        help="weights; calibrated (the default data-aware path: at d/8 allocated and refined); "
                             "uniform (calibrated, --uniform); closed (calibrated, --refine 0)")
    parser.add_argument("--divisor", type=int, default=4, help="key dim = hidden size / this (4: d/4, 8: d/8)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) checkpoints and outputs here")
    args = parser.parse_args()
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    unknown = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown sizes or modes: {', '.join(unknown)}")

    with tempfile.TemporaryDirectory(prefix="mhacompress-memory-") as tmp:
        work = args.workdir or Path(tmp)
        rows = []
        for size in sizes:
            folder = work / size
            build_checkpoint(size, folder)
            mb = (folder / "model.safetensors").stat().st_size / 2**20
            for mode in modes:
                key_dim = SIZES[size][2] * 4 // args.divisor  # SIZES holds d/4
                run = run_reduce(folder, key_dim, mode, work / f"{size}-out", args.samples)
                rows.append((size, mode, mb, run))
                print(f"{size} {mode}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", file=sys.stderr)

    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the "
          f"end; `reduce --key-dim d/{args.divisor} --output` in a child process; calibrated: mrpc, "
          f"{args.samples} samples\n")
    print("| model | params | checkpoint MB | run | peak RSS MB | RSS / checkpoint | target | seconds |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for size, mode, mb, run in rows:
        params = run["report"].get("model_params", {}).get("before")
        ratio, target = run["peak_rss_mb"] / mb, 1.5 if mode == "weights" else 2.0
        run_name = "weights only" if mode == "weights" else " ".join(MODES[mode] + ["--samples", str(args.samples)])
        print(f"| {LABELS[size]} | {params / 1e6:.0f}M | {mb:.0f} | {run_name} | {run['peak_rss_mb']:.0f} | "
              f"{ratio:.2f}x | {'<=' if ratio <= target else '**>**'} {target}x | {run['seconds']:.1f} |")


if __name__ == "__main__":
    main()
