"""Fine-tune an original or a reduced model on a GLUE task's train split (AdamW, linear warm-up and decay), keeping
collaborative attention layers as they are (save the result with ``hub.save``)."""

from __future__ import annotations

import copy
import math
import random
from typing import Callable

import torch

from ..errors import UsageError
from .data import Examples
from .runner import check_vocabulary, encode, head_order, input_keys, is_classifier, usable_length
from .tasks import Task


def _problem_type(task: Task) -> str:
    """The loss transformers' heads compute for ``task`` (config.problem_type)."""
    return "regression" if task.regression else "single_label_classification"


def with_head(model, task: Task, *, seed: int = 0, name: str = "the model"):
    """``model`` itself when it already has a head that fits ``task``; for a plain encoder (original or reduced), a
    sequence-classification model around the same encoder weights with a fresh head (num_labels of the task, one
    regression output for STS-B), labelled with the task's label names. The task decides the loss: a config.json
    whose ``problem_type`` says otherwise (multi-label, or regression on a 2-label head) is set to the task's."""
    if is_classifier(model):
        head_order(model, task, name, fix="finetune keeps an existing head, so start from the encoder it was "
                                          "fine-tuned from (a checkpoint without this head)")  # not: run finetune
        model.config.problem_type = _problem_type(task)
        return model
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from ..reduction.modeling import COMPRESSION_KEY, base_model_type, collaborative_model_class

    config = copy.deepcopy(model.config)
    cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[base_model_type(config)]
    config.num_labels = task.num_labels
    names = task.labels or ("score",)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = _problem_type(task)
    config.architectures = [cls_name]
    block = getattr(config, COMPRESSION_KEY, None)
    if block:
        block = copy.deepcopy(block)
        block["base_architecture"] = cls_name
        setattr(config, COMPRESSION_KEY, block)
        cls = collaborative_model_class(cls_name)
    else:
        import transformers

        cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    new = cls(config)
    missing, unexpected = new.base_model.load_state_dict(model.state_dict(), strict=False)
    # the pooler may go either way: BERT's head reads it (a sentence encoder may ship without), RoBERTa's, MPNet's
    # and their kin build their encoder without one and read the first token (transformers drops it too)
    if not all(k.startswith("pooler.") for k in missing + unexpected):
        raise UsageError(f"{name}'s weights do not fit a {cls_name} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); fine-tune the original checkpoint instead")
    param = next(model.parameters())
    return new.to(device=param.device, dtype=param.dtype)


def length_grouped_batches(lengths: list[int], batch_size: int, gen: random.Random, group: int = 50) -> list[list[int]]:
    """Shuffled batches of similar length (HF's group_by_length): shuffle, sort within chunks of ``group`` batches,
    cut into batches, shuffle the batches. Less padding, same randomness of the data order."""
    idx = list(range(len(lengths)))
    gen.shuffle(idx)
    chunk = batch_size * group
    out = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start:start + chunk], key=lambda i: -lengths[i])
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    gen.shuffle(out)
    return out


def train(model, tokenizer, examples: Examples, *, epochs: float = 3, lr: float = 2e-5, batch_size: int = 32,
          max_length: int = 128, warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 0, device: str = "cpu",
          on_step: Callable[[float], None] | None = None) -> dict:
    """Fine-tune ``model`` (with a head that fits the task) in place; returns the loss of every step."""
    assert examples.labels is not None, f"{examples.split} has no labels to train on"
    task = examples.task
    torch.manual_seed(seed)
    gen = random.Random(seed)
    enc = encode(tokenizer, examples.texts, usable_length(model, max_length))
    check_vocabulary(enc["input_ids"], model)
    keys = input_keys(enc, model)
    lengths = [len(x) for x in enc["input_ids"]]
    per_epoch = math.ceil(len(examples) / batch_size)
    total = max(1, round(epochs * per_epoch))
    order = head_order(model, task)  # task label j is head column order[j]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    warm = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.to(device).train()
    losses, batches = [], []
    while len(losses) < total:
        if not batches:
            batches = length_grouped_batches(lengths, batch_size, gen)
        idx = batches.pop(0)
        batch = tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx], return_tensors="pt",
                              padding_side="right")  # as eval pads (runner.batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        if task.regression:
            labels = torch.tensor([examples.labels[i] for i in idx], dtype=torch.float, device=device)
        else:
            labels = torch.tensor([order[examples.labels[i]] for i in idx], device=device)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    model.eval()
    return {"steps": total, "examples": len(examples), "losses": losses}


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
