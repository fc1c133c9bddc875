"""Layer-local refinement (`reduce --refine STEPS`): after the (calibrated) decomposition, fit each collaborative
layer's shared projections, mixing and content bias so that it reproduces the ORIGINAL layer's attention output on
the calibration sequences. Unlabelled, one layer at a time, everything else frozen, no end-to-end training.

The inputs of every layer are recorded once from the original model, so layers are fitted independently on the
hidden states the original network produces (not on those of already-reduced layers upstream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .modeling import attention_modules


@dataclass
class Call:
    """One recorded call of a self-attention module: its arguments, its output (B, T, d) and the token mask (B, T)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor
    tokens: torch.Tensor


@torch.no_grad()
def record_calls(model, encodings: Iterable[dict], on_batch: Callable[[int], None] | None = None
                 ) -> list[list[Call]]:
    """For every self-attention layer of the (original) model, its calls over ``encodings``."""
    found = attention_modules(model)
    calls: list[list[Call]] = [[] for _ in found]
    tokens: dict[str, torch.Tensor] = {}

    def hook(index):
        def post(module, args, kwargs, output):
            kept = {k: v for k, v in kwargs.items() if k != "output_attentions"}
            calls[index].append(Call(args, kept, output[0].detach(), tokens["mask"]))
        return post

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, (_, _, m) in enumerate(found)]
    try:
        for enc in encodings:
            tokens["mask"] = enc["attention_mask"].bool()
            model(**enc)
            if on_batch:
                on_batch(enc["attention_mask"].shape[0])
    finally:
        for h in handles:
            h.remove()
    return calls


def input_moments(calls: list[list[Call]]) -> list[torch.Tensor]:
    """Each layer's input second moment over real tokens, from recorded calls: what calibrate.second_moments gives
    for the same encodings, without a second forward pass of the model."""
    moments = []
    for layer_calls in calls:
        inputs = [(c.args[0] if c.args else c.kwargs["hidden_states"])[c.tokens].double() for c in layer_calls]
        total = sum(x.T.cpu() @ x.cpu() for x in inputs)  # (d, d), summed batch by batch like second_moments
        moments.append(total / max(sum(x.shape[0] for x in inputs), 1))
    return moments


def refine_(model, calls: list[list[Call]], steps: int, *, lr: float = 1e-3, seed: int = 0,
            on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit every collaborative layer to its recorded original outputs with ``steps`` Adam steps (one recorded batch
    a step, in order). Returns per layer the relative output error before and after."""
    torch.manual_seed(seed)
    report = []
    for index, ((_, _, module), layer_calls) in enumerate(zip(attention_modules(model), calls)):
        params = [module.query_proj.weight, module.key_proj.weight, module.content_bias.weight]
        params += [module.mixing] if module.mixing is not None else []
        frozen = {p: p.requires_grad for p in module.parameters()}
        for p in module.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        was_training = module.training
        module.eval()  # no dropout while fitting
        before = output_error(module, layer_calls)
        optimizer = torch.optim.Adam(params, lr=lr)
        try:
            for step in range(steps):
                call = layer_calls[step % len(layer_calls)]
                loss = _loss(module, call)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            module.train(was_training)
        report.append({"index": index, "output_error_before": before, "output_error_after": output_error(module,
                                                                                                          layer_calls)})
        if on_layer:
            on_layer(report[-1])
    return report


def _loss(module, call: Call) -> torch.Tensor:
    out = module(*call.args, **call.kwargs)[0]  # (B, T, d)
    diff = (out - call.output)[call.tokens]  # real tokens only
    return diff.pow(2).sum() / call.output[call.tokens].pow(2).sum()


@torch.no_grad()
def output_error(module, calls: list[Call]) -> float:
    """Relative error ||out - original|| / ||original|| over all recorded real tokens."""
    num = den = 0.0
    for call in calls:
        out = module(*call.args, **call.kwargs)[0]
        num += float((out - call.output)[call.tokens].pow(2).sum())
        den += float(call.output[call.tokens].pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5
