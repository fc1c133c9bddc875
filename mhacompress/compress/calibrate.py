"""Data-aware reduction: each layer's input second moment C = E[x x^T] from calibration text, and the whitening
that turns "error of the weights" into "expected error of the attention scores on that data".

For x, y drawn from the layer's inputs, E[(x^T (A - A_hat) y)^2] = ||C^1/2 (A - A_hat) C^1/2||_F^2 (independent x, y
with second moment C). So decomposing the whitened products C^1/2 A_h C^1/2 = (W_q^h C^1/2)^T (W_k^h C^1/2) and
mapping the factors back (U <- C^-1/2 U, V <- C^-1/2 V) minimises the expected score error; the solver's relative
error in the whitened space is that expected error, relative to E[(x^T A y)^2].
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import UsageError
from .decompose import Factors
from .modeling import arch_for, attention_modules


def calibration_texts(source: str, samples: int, *, seed: int = 0, pairs: bool = True,
                      data_dir: str | None = None) -> list[tuple[str, ...]]:
    """``samples`` texts from a GLUE task's TRAIN split, a text file (one sequence a line) or a jsonl file (``text``,
    or ``sentence1``/``sentence2``, or ``question``/``sentence``... : every string field of a record, in order).
    ``pairs=False`` splits sentence pairs into single sentences (for sentence encoders)."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    path = Path(source).expanduser()
    if path.is_file():
        texts = _read_file(path)
    elif path.suffix in (".txt", ".jsonl", ".json") or "/" in source:
        raise UsageError(f"no calibration file at {source!r}; pass a GLUE task name, a .txt or a .jsonl file")
    else:
        from ..eval.data import load_examples
        from ..eval.tasks import get_task

        try:
            task = get_task(source)
        except UsageError as err:
            raise UsageError(f"{err} (or pass a .txt / .jsonl file to --calibrate)") from None
        texts = load_examples(task, "train", data_dir=data_dir, limit=samples, seed=seed).texts
    if not pairs:
        texts = [(t,) for pair in texts for t in pair]
    if not texts:
        raise UsageError(f"no calibration text in {source!r}")
    if len(texts) > samples:
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), samples))]
    return texts


def _read_file(path: Path) -> list[tuple[str, ...]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [(line,) for line in lines]
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not valid JSON; a .jsonl file holds one JSON object a line") from None
        if isinstance(record, str):
            texts.append((record,))
            continue
        fields = [record["text"]] if isinstance(record.get("text"), str) else [
            v for v in record.values() if isinstance(v, str)]
        if not fields:
            raise UsageError(f"{path}:{n} has no text field (expected e.g. {{\"text\": \"...\"}})")
        texts.append(tuple(fields[:2]))
    return texts


@torch.no_grad()
def second_moments(model, encodings: Iterable[dict], on_batch: Callable[[int], None] | None = None
                   ) -> list[torch.Tensor]:
    """C_l = mean over real (non-padding) tokens of x x^T (d, d), float64, for the input x of every self-attention
    layer, from one forward pass over ``encodings`` (tokenizer outputs with an attention_mask) of the model, which
    must still be the ORIGINAL."""
    found = attention_modules(model)
    d = getattr(model.config, arch_for(model.config).hidden)
    sums = [torch.zeros(d, d, dtype=torch.float64) for _ in found]
    counts = [0] * len(found)
    mask: dict[str, torch.Tensor] = {}

    def hook(index):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            x = x[mask["tokens"].bool()].double()  # (N, d) real tokens only
            sums[index].add_(x.T.cpu() @ x.cpu())
            counts[index] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, (_, _, m) in enumerate(found)]
    device = next(model.parameters()).device
    try:
        for enc in encodings:
            mask["tokens"] = enc["attention_mask"].to(device)
            model(**{k: v.to(device) for k, v in enc.items()})
            if on_batch:
                on_batch(enc["attention_mask"].shape[0])
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def whitening(moment: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^1/2, C^-1/2), symmetric, with eigenvalues floored at ``eps`` x the largest (rank-deficient data)."""
    evals, vecs = torch.linalg.eigh(moment.to(torch.float64))  # (d,), (d, d)
    evals = evals.clamp_min(eps * evals.max())
    return (vecs * evals.sqrt()) @ vecs.T, (vecs * evals.rsqrt()) @ vecs.T


def whiten(wq: torch.Tensor, wk: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whitened problem: W_q C^1/2 and W_k C^1/2 (float64), whose score tensor's error is the expected score
    error on the calibration data, and C^-1/2 to map its factors back (``unwhiten``)."""
    sqrt, inv_sqrt = whitening(moment)
    return wq.double() @ sqrt, wk.double() @ sqrt, inv_sqrt


def unwhiten(factors: Factors, inv_sqrt: torch.Tensor) -> Factors:
    """Map factors of C^1/2 A C^1/2 back to A: U <- C^-1/2 U, V <- C^-1/2 V (per head for svd)."""
    return replace(factors, U=inv_sqrt @ factors.U, V=inv_sqrt @ factors.V)
