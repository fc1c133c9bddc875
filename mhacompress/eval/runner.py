"""Batched inference for GLUE: length-sorted batches with dynamic padding, under torch.inference_mode.

Two kinds of model: a sequence-classification checkpoint (its head's labels mapped to the task's through
``id2label``) and a plain sentence encoder (STS-B only: cosine similarity of its sentence embeddings, made as its
sentence-transformers folder says, else mean pooled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UsageError, named
from ..reduction.modeling import is_classifier, max_tokens
from ..reduction.objectives import pooled, pooling_of
from . import metrics as M
from .data import Examples
from .tasks import Task


@dataclass
class Outputs:
    """What a model made of a split: ``scores`` (N, C) logits in the task's label order, (N,) regression values or
    (N,) cosine similarities; ``preds`` what the metrics compare to labels; ``embeddings`` (2, N, d) for encoders."""

    kind: str  # "classifier" or "encoder"
    scores: torch.Tensor
    preds: list
    embeddings: torch.Tensor | None = None


def _finetune_hint(task: Task) -> str:
    """How to fine-tune a model on ``task``, as the caller would: the command, or in Python the call."""
    return named(f"mhacompress finetune MODEL --task {task.name} --output DIR",
                 f"mhacompress.finetune(MODEL, {task.name!r}, DIR)")


def head_order(model, task: Task, name: str = "the model", fix: str | None = None) -> list[int] | None:
    """For each of the task's labels, the column of the model's head that scores it; a head that does not fit the
    task is a UsageError (``fix``: what it says to do, instead of fine-tuning one). Default names (LABEL_0, ...)
    are taken to be in the task's order."""
    n = model.config.num_labels
    fix = fix or f"fine-tune one: {_finetune_hint(task)}"
    if task.regression:
        if n != 1:
            raise UsageError(f"{name} has a {n}-label classification head; {task.name} needs a 1-output regression "
                             f"head ({fix})")
        return None
    if n != task.num_labels:
        raise UsageError(f"{name} has a {n}-label head; {task.name} needs {task.num_labels} labels "
                         f"({', '.join(task.labels)}): {fix}")
    norm = lambda s: str(s).strip().lower().replace(" ", "_").replace("-", "_")  # noqa: E731
    id2label = getattr(model.config, "id2label", None) or {}
    if sorted(id2label) != list(range(n)):  # transformers makes the keys ints: {1: .., 2: ..} names no column 0
        raise UsageError(f"{name}'s config.json id2label has keys {', '.join(map(str, sorted(id2label)))[:80]}, not "
                         f"the head's columns 0 to {n - 1}: number its labels from 0 in its config.json")
    names = [norm(id2label[i]) for i in range(n)]
    if all(x in (f"label_{i}", str(i)) for i, x in enumerate(names)):
        return list(range(n))
    try:
        return [names.index(norm(label)) for label in task.labels]
    except ValueError:
        raise UsageError(f"{name}'s head labels ({', '.join(names)}) do not match {task.name}'s "
                         f"({', '.join(task.labels)}): score it on the task it was fine-tuned for, or, if its columns "
                         f"are {task.name}'s in another spelling, name them so in its config.json id2label") from None


def usable_length(model, max_length: int) -> int:
    """``max_length`` capped to the positions the model has (``max_tokens``): longer inputs would fail inside the
    embeddings."""
    limit = max_tokens(model)
    return max_length if limit is None else max(1, min(max_length, limit))


def input_keys(enc, model=None) -> list[str]:
    """The tokenizer outputs a model reads: token_type_ids only where the model has more than one segment type (a
    type vocabulary of one, RoBERTa-style, takes segment 0 alone; a BERT tokenizer's 1s would index past it)."""
    types = getattr(getattr(model, "config", None), "type_vocab_size", None)
    segments = not isinstance(types, int) or types > 1
    return [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc
            and (segments or k != "token_type_ids")]


def check_vocabulary(input_ids: list[list[int]], model) -> None:
    """Refuse token ids beyond the model's embedding table (a tokenizer that is not the model's) in one line, before
    they reach the embeddings as an IndexError."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    top = max((max(ids) for ids in input_ids if ids), default=-1)
    if rows is not None and top >= rows:
        raise UsageError(f"the tokenizer gives token id {top} but the model's embeddings have {rows} rows: the "
                         f"tokenizer is not this model's; use the model's own (saved beside it in its folder)")


CHARS_PER_TOKEN = 64  # a field longer than max_length x this many characters is cut first (``bounded``)
TOKEN_MARGIN = 16  # tokens a cut field keeps past max_length, so that the word cut in two lies beyond what is kept


def bounded(tokenizer, fields: tuple[str, ...], max_length: int) -> tuple[str, ...]:
    """``fields`` with each very long one cut to the shortest prefix (from max_length x CHARS_PER_TOKEN characters,
    growing fourfold) that the tokenizer turns into at least max_length + TOKEN_MARGIN tokens: the same encoding once
    truncated to max_length, without encoding the megabytes of a long line that truncation throws away (a 40 MB line
    took 6 GB). A tokenizer splits words apart, and the word cut in two lies past the margin; a pair's longest-first
    truncation keeps at most max_length of either, the longer one losing tokens first, so a cut field grows until
    it is longer than an uncut partner it is longer than in full. Where BOTH fields of a pair are that long, which of
    the two keeps the odd token is decided on their prefixes."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix(text: str, size: int, enough) -> str:
        while size < len(text):
            if enough(count(text[:size])):
                return text[:size]
            size *= 4
        return text

    start = max_length * CHARS_PER_TOKEN
    cut = [prefix(f, start, lambda n: n >= max_length + TOKEN_MARGIN) for f in fields]
    short = [i for i, f in enumerate(fields) if len(cut[i]) == len(f)]
    if len(fields) == 2 and len(short) == 1:  # one field cut: it stays the longer, as in full
        whole = count(fields[short[0]])
        long = 1 - short[0]
        cut[long] = prefix(fields[long], len(cut[long]), lambda n: n > whole and n >= max_length + TOKEN_MARGIN)
    return tuple(cut)


def encode(tokenizer, texts: list[tuple[str, ...]], max_length: int):
    """The tokenizer's encoding of ``texts`` (one tuple of fields each), truncated to ``max_length`` (a very long
    field cut to a prefix first: ``bounded``). A tokenizer that cannot pad a batch, or fails on the text (the
    tokenizers library's bare Exception: "Missing [UNK] token from the vocabulary"), is refused in one line: its
    folder's tokenizer files are damaged."""
    fix = "restore the model's own tokenizer files (tokenizer.save_pretrained(DIR))"
    if tokenizer.pad_token is None:
        raise UsageError(f"the tokenizer has no padding token (tokenizer_config.json's pad_token), so batches "
                         f"cannot be padded; {fix}")
    try:
        texts = [bounded(tokenizer, fields, max_length) for fields in texts]
        return tokenizer(*[list(c) for c in zip(*texts)], truncation=True, max_length=max_length)
    except Exception as err:
        if type(err) is not Exception:
            raise
        why = (str(err).strip() or "Exception").splitlines()[0][:200]
        raise UsageError(f"the tokenizer failed: {why}; {fix}") from None


def batches(tokenizer, texts: list[tuple[str, ...]], *, batch_size: int = 32, max_length: int = 128,
            sort: bool = True, pad_to_max: bool = False, model=None):
    """Yield (indices, encoding): longest-first length-sorted batches padded to their own longest sequence
    (``sort=False, pad_to_max=True`` is the naive scheme, kept for the speed benchmark), with the fields ``model``
    reads (``input_keys``)."""
    enc = encode(tokenizer, texts, max_length)
    if model is not None:
        check_vocabulary(enc["input_ids"], model)
    order = sorted(range(len(texts)), key=lambda i: -len(enc["input_ids"][i])) if sort else list(range(len(texts)))
    keys = input_keys(enc, model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        feats = [{k: enc[k][i] for k in keys} for i in idx]
        padding = "max_length" if pad_to_max else "longest"
        # on the right whatever the tokenizer was saved with: every architecture of the table numbers positions from
        # the first token and its classifier heads read that token, so left padding would move both
        yield idx, tokenizer.pad(feats, padding=padding, max_length=max_length, return_tensors="pt",
                                 padding_side="right")


@torch.inference_mode()
def forward_all(model, tokenizer, texts, *, fn, batch_size=32, max_length=128, device="cpu",
                on_batch: Callable[[int], None] | None = None, name: str = "the model", inputs: str = "its inputs",
                **kw) -> torch.Tensor:
    """Run ``fn(model, encoding) -> (B, ...)`` over all texts in sorted batches; results in the input order. Outputs
    that are not finite (``check_finite_outputs``) are refused at the first batch that has them."""
    out = None
    max_length = usable_length(model, max_length)
    for idx, enc in batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, model=model, **kw):
        enc = {k: v.to(device) for k, v in enc.items()}
        y = fn(model, enc).float().cpu()
        check_finite_outputs(y, model, name, inputs)
        if out is None:
            out = torch.empty((len(texts), *y.shape[1:]))
        out[idx] = y
        if on_batch:
            on_batch(len(idx))
    return out if out is not None else torch.empty(0)


def check_finite_outputs(y: torch.Tensor, model, name: str = "the model", inputs: str = "its inputs") -> None:
    """Refuse NaN or infinite outputs (logits, embeddings) in one line: a model whose weights are finite but too
    large for its dtype. Scored, they gave null metrics, or argmax's class 0 for NaN logits, with exit 0. Metrics that
    are undefined for finite outputs (the correlation of a constant prediction) are not this model's fault: not
    refused."""
    if y.numel() and not bool(torch.isfinite(y).all()):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        half = dtype in ("float16", "bfloat16")
        fix = (f"check the checkpoint, or load it in float32 ({dtype} overflows where float32 may not)" if half else
               "check the checkpoint (weights scaled up by mistake, or a training run that diverged)")
        raise UsageError(f"{name}'s outputs overflowed to nan/inf on {inputs} (its {dtype} weights are finite but too "
                         f"large): {fix}")


def _logits(model, enc):
    return model(**enc).logits  # (B, C)


def _embedding(model, enc):
    """The sentence embedding (B, d') as the model's sentence-transformers folder makes it (``hub.sentence_head``:
    its pooling, then its Dense layer), else mean pooled."""
    head = getattr(model, "sentence_head", None)
    out = pooled(model(**enc).last_hidden_state, enc["attention_mask"], pooling_of(model))  # (B, d)
    if head is None or head.dense is None:
        return out
    weight, bias, activation = head.dense
    out = torch.nn.functional.linear(out, weight.to(out), None if bias is None else bias.to(out))  # (B, d')
    return getattr(torch.nn, activation)()(out)


def check_embedding(model, name: str) -> None:
    """A sentence-transformers folder whose embedding mhacompress cannot reproduce is refused for scoring in one
    line, not scored by another embedding than its users get."""
    head = getattr(model, "sentence_head", None)
    if head is not None and head.unsupported:
        raise UsageError(f"{name}'s sentence embedding cannot be reproduced: mhacompress does not read "
                         f"{head.unsupported}; score it with sentence-transformers, or score the transformer alone "
                         f"(its folder without modules.json, mean pooled)")


def run(model, tokenizer, examples: Examples, *, name: str = "the model", allow_encoder_any_task: bool = False,
        **kw) -> Outputs:
    """Score a split. kw: batch_size, max_length, device, on_batch (called with the batch size)."""
    task = examples.task
    inputs = f"{task.name}'s inputs"
    if is_classifier(model):
        order = head_order(model, task, name)
        logits = forward_all(model, tokenizer, examples.texts, fn=_logits, name=name, inputs=inputs, **kw)  # (N, C)
        if task.regression:
            scores = logits[:, 0]
            return Outputs("classifier", scores, scores.tolist())
        scores = logits[:, order]
        return Outputs("classifier", scores, scores.argmax(-1).tolist())
    if not task.regression and not allow_encoder_any_task:
        raise UsageError(f"{name} is a plain encoder without a classification head: it can only be scored on stsb "
                         f"(cosine similarity); fine-tune it first: {_finetune_hint(task)}")
    check_embedding(model, name)
    fields = list(zip(*examples.texts))  # (F, N)
    flat = [(s,) for field in fields for s in field]
    emb = forward_all(model, tokenizer, flat, fn=_embedding, name=name, inputs=inputs, **kw)
    emb = emb.view(len(fields), len(examples), -1)  # (F, N, d)
    if len(fields) == 2:
        scores = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=-1)  # (N,)
    else:
        scores = torch.zeros(len(examples))
    return Outputs("encoder", scores, scores.tolist(), emb)


def score(examples: Examples, outputs: Outputs) -> dict[str, float]:
    """The task's official metrics, or {} when the split has no labels."""
    if examples.labels is None:
        return {}
    return M.compute(examples.task, outputs.preds, examples.labels)


def fidelity(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    """Label-free agreement with the reference model on the same inputs: prediction agreement and mean
    KL(reference || model) for classifiers, Pearson and mean absolute difference for regression heads, mean cosine
    of embeddings for encoders."""
    if outputs.kind != reference.kind:
        raise UsageError(f"cannot compare a {outputs.kind} with a {reference.kind} reference")
    if outputs.kind == "encoder":
        a, b = outputs.embeddings.flatten(0, 1), reference.embeddings.flatten(0, 1)  # (F*N, d)
        return {"embedding_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())}
    if outputs.scores.dim() == 1:
        diff = (outputs.scores - reference.scores).abs().mean()
        return {"pearson": M.pearson(outputs.scores.numpy(), reference.scores.numpy()), "mean_abs_diff": float(diff)}
    logp, logq = reference.scores.log_softmax(-1), outputs.scores.log_softmax(-1)  # (N, C)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    agree = (outputs.scores.argmax(-1) == reference.scores.argmax(-1)).float().mean()
    return {"agreement": float(agree), "kl": float(kl)}
