"""Sequential (bottom-up) data-aware reduction: each layer is fitted on the inputs that the already-reduced layers
below it actually produce, with the ORIGINAL model's activations as targets, so errors are corrected rather than
compounded (Kwon et al. 2022's layer-wise reconstruction, SVD-LLM's sequential update).

Two activation streams advance one layer at a time: x, the original model's hidden states, and x~, the reduced
model's. For layer l, one pass over the calibration batches accumulates second moments (never the activations
themselves) and runs the ORIGINAL layer on x; the layer is then solved in closed form and installed; a second pass
runs the REDUCED layer on x~. Hidden states that must outlive a pass are spilled to a temporary folder, so memory does
not grow with the number of calibration sequences. The total cost is about one forward pass of each model.

Per layer (d hidden, H heads; see docs/method.md for the derivation), with the default ``output`` objective:
  * query/key: the decomposition is fitted in the metric of the layer's attention OUTPUT under the original
    attention probabilities, centred, head- and token-weighted (see objectives.py), with the original scores carried
    to the reduced stream by least-squares input maps;
with the ``score`` objective (the simpler rung of the ablation):
  * query/key: the least-squares input map P = E[x x~^T] E[x~ x~^T]^-1 (x ~ P x~) turns the original scores
    x^T A_h y into x~^T (P^T A_h P) y~; the reduced layer is the method's decomposition of (W_q P, W_k P), whitened
    by the reduced stream's own second moments (query side Cq, key side Ck), which minimises the expected score error
    E[(x~^T A~_h y~ - x^T A_h y)^2] over independent query/key tokens. The content bias maps through P as well.
  * compensation: a ridge least-squares refit of the attention output projection W_O, b so that the residual sum
    x~ + W_O' ctx~ + b' matches the original's x + W_O ctx + b (token-weighted like the objective), its pull towards
    W_O chosen per layer by two-fold cross-validation over the calibration batches (``Ridge.cross_validated``).
  * refinement (optional): Adam steps on the query/key parameters against the same residual-sum target.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..devices import cpu_threads, work_device
from ..residency import release, trim
from . import methods
from .calibrate import unwhiten
from .config import OBJECTIVES, ReductionConfig
from .decompose import relative_error, solving_layer
from .modeling import arch_for, attention_modules
from .modeling import layers as model_layers
from .modeling.attention import additive_mask
from .modeling.kernels import forget_fused
from .objectives import (
    OutputMoments,
    centred_content_bias,
    head_gram,
    norm_gain,
    output_metric,
    readout_weights,
    ridge_map,
    rollout,
    unscale_heads,
    whitened_problem,
)
from .surgery import content_bias, decompose_layer, install_, model_shape, qk_parameters, qk_weights

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, once the hook has what it needs."""


# ---- running one layer on stored hidden states ------------------------------------------------------------


@dataclass
class Batch:
    """One calibration batch: the tokenizer's output and its real-token mask (B, T)."""

    encoding: dict
    tokens: torch.Tensor


def call_of(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """The (args, kwargs) ``module`` is first called with while ``run()`` runs; a hook ends the run there, so nothing
    after that call is computed."""
    captured = {}

    def grab(mod, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["args"], dict(captured["kwargs"])


def layer_inputs(model: nn.Module, encoding: dict) -> tuple[torch.Tensor, tuple, dict]:
    """What the model passes to its first layer for ``encoding``: hidden states (B, T, d) and the other arguments
    (attention mask, position bias, ...), which every layer of these encoders receives alike. Only the embeddings
    run."""
    args, kwargs = call_of(model_layers(model)[0], lambda: model(**encoding))
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, args[1:], kwargs


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One layer's output hidden states (B, T, d)."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_until(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of ``module`` (a submodule of ``layer``, called positionally) when ``layer`` runs on ``hidden``; the
    rest is skipped."""
    return call_of(module, lambda: run_layer(layer, hidden, args, kwargs))[0][0]


def run_recording(layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, args: tuple,
                  kwargs: dict) -> tuple[torch.Tensor, dict[str, tuple[tuple, dict]]]:
    """One layer's output, and the (args, kwargs) each of the named submodules was called with on the way."""
    seen: dict[str, tuple[tuple, dict]] = {}

    def recorder(name):
        def pre(module, a, k):
            seen[name] = (a, k)
        return pre

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in modules.items()]
    try:
        out = run_layer(layer, hidden, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def original_attention(module: nn.Module, arch, heads: int, call: tuple[tuple, dict]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """An ORIGINAL self-attention module's probabilities (B, H, T, T) and values (B, H, T, dh), recomputed (in at
    least float32) from the call it received: (hidden_states, attention_mask, position_bias), as every supported
    architecture passes them."""
    names = ("hidden_states", "attention_mask", "position_bias")
    args, kwargs = call
    given = {**dict(zip(names, args)), **{n: kwargs[n] for n in names if n in kwargs}}
    x = given["hidden_states"]
    dtype = torch.promote_types(x.dtype, torch.float32)
    (B, T, _), x = x.shape, x.to(dtype)

    def split(name):  # (B, H, T, dh)
        lin = getattr(module, name)
        return nn.functional.linear(x, lin.weight.to(dtype), None if lin.bias is None else lin.bias.to(dtype)
                                    ).view(B, T, heads, -1).transpose(1, 2)

    q, k, v = split(arch.query), split(arch.key), split(arch.value)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, T, T)
    mask = additive_mask(given.get("attention_mask"), dtype)
    if mask is not None:
        scores = scores + mask
    if given.get("position_bias") is not None:
        scores = scores + given["position_bias"].to(dtype)
    return scores.softmax(-1), v


@dataclass(frozen=True)
class _Slot:
    """Where a spilled call's tensor went."""

    key: str


class Spill:
    """Hidden states of every calibration batch at one depth, kept in a temporary folder (safetensors files), so
    that memory holds one batch at a time whatever the number of sequences."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: dict[int, tuple[tuple, dict]] = {}  # per batch: the call's arguments, tensors replaced by _Slot

    def write(self, stream: str, index: int, x: torch.Tensor) -> None:
        save_file({"x": x.detach().to("cpu").contiguous()}, str(self.folder / f"{stream}-{index}.safetensors"))

    def read(self, stream: str, index: int, device) -> torch.Tensor:
        return load_file(str(self.folder / f"{stream}-{index}.safetensors"))["x"].to(device)

    def write_call(self, index: int, args: tuple, kwargs: dict) -> None:
        """A layer call's other arguments (masks, position bias, ...): the tensors to a file, the rest in memory."""
        tensors: dict[str, torch.Tensor] = {}

        def strip(value):
            if isinstance(value, torch.Tensor):
                tensors[str(len(tensors))] = value.detach().to("cpu").contiguous()
                return _Slot(str(len(tensors) - 1))
            return value

        self.calls[index] = (tuple(strip(a) for a in args), {k: strip(v) for k, v in kwargs.items()})
        save_file(tensors, str(self.folder / f"call-{index}.safetensors"))

    def read_call(self, index: int, device) -> tuple[tuple, dict]:
        tensors = load_file(str(self.folder / f"call-{index}.safetensors"))
        args, kwargs = self.calls[index]

        def fill(value):
            return tensors[value.key].to(device) if isinstance(value, _Slot) else value

        return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}

    def rename(self, old: str, new: str, count: int) -> None:
        for i in range(count):
            (self.folder / f"{old}-{i}.safetensors").replace(self.folder / f"{new}-{i}.safetensors")


# ---- statistics -------------------------------------------------------------------------------------------


@dataclass
class LayerMoments:
    """Sums over real tokens, float64: x~ x~^T over query and key positions, and x x~^T (the input map)."""

    d: int
    device: torch.device = torch.device("cpu")  # where the sums live (the solvers' device)
    query: torch.Tensor = None  # sum x~_i x~_i^T over query positions (d, d)
    key: torch.Tensor = None  # sum y~ y~^T over key positions (d, d)
    cross: torch.Tensor = None  # sum x y~^T over key positions (d, d)
    n_query: int = 0
    n_key: int = 0

    def __post_init__(self):
        self.query, self.key, self.cross = (torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
                                            for _ in range(3))

    def add(self, x: torch.Tensor, xr: torch.Tensor, tokens: torch.Tensor, queries: torch.Tensor) -> None:
        """x, xr (B, T, d): original and reduced inputs; tokens, queries (B, T) bool: real and query positions."""
        # one batch's sums in the activations' precision (at least float32: a few hundred tokens, rounding far below
        # the data's noise), the running totals in float64
        dtype = torch.promote_types(x.dtype, torch.float32)
        k, kr, q = (t.to(self.device, dtype) for t in (x[tokens], xr[tokens], xr[queries]))  # (N|Nq, d)
        self.key += (kr.T @ kr).double()
        self.cross += (k.T @ kr).double()
        self.query += (q.T @ q).double()
        self.n_key += k.shape[0]
        self.n_query += q.shape[0]

    def input_map(self, ridge: float = 1e-3) -> torch.Tensor:
        """P (d, d) with x ~ P x~ in least squares, E[x x~^T] E[x~ x~^T]^-1, pulled towards the identity where the
        tokens say nothing (``objectives.ridge_map``)."""
        return ridge_map(self.key / self.n_key, self.cross / self.n_key, ridge)

    def query_moment(self) -> torch.Tensor:
        return self.query / max(self.n_query, 1)

    def key_moment(self) -> torch.Tensor:
        return self.key / max(self.n_key, 1)


FOLDS = 2  # folds of the calibration batches that choose the compensation's ridge strength
STRENGTHS = (1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # the ridge strengths the cross-validation chooses from
BEYOND = 6  # steps (at the grid's ratio) the cross-validation may take past whichever end of the grid wins


@dataclass
class Ridge:
    """Normal equations of a ridge least-squares refit of a linear map z -> W z + b, accumulated batch by batch, per
    fold (rows of batch i go to fold i % folds), so that the ridge's strength can be chosen by cross-validation."""

    d_in: int
    d_out: int
    device: torch.device = torch.device("cpu")
    folds: int = 1
    grams: torch.Tensor = None  # per fold: sum [z; 1][z; 1]^T (folds, d_in + 1, d_in + 1)
    rhss: torch.Tensor = None  # per fold: sum [z; 1] t^T (folds, d_in + 1, d_out)
    targets: list[float] = None  # per fold: sum w ||t||^2
    counts: list[int] = None  # per fold: rows

    def __post_init__(self):
        n = self.d_in + 1
        self.grams = torch.zeros(self.folds, n, n, dtype=torch.float64, device=self.device)
        self.rhss = torch.zeros(self.folds, n, self.d_out, dtype=torch.float64, device=self.device)
        self.targets, self.counts = [0.0] * self.folds, [0] * self.folds

    @property
    def gram(self) -> torch.Tensor:
        return self.grams.sum(0)

    @property
    def rhs(self) -> torch.Tensor:
        return self.rhss.sum(0)

    @property
    def target(self) -> float:
        return sum(self.targets)

    def add(self, z: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None, batch: int = 0) -> None:
        """z (N, d_in) inputs, t (N, d_out) targets, optional row weights (N,), of calibration batch ``batch``."""
        f = batch % self.folds
        z = z.to(self.device, torch.float64)
        z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=torch.float64, device=self.device)], dim=1)  # (N, d_in+1)
        zw = z if weights is None else z * weights.to(self.device, torch.float64)[:, None]
        self.grams[f] += zw.T @ z
        t = t.to(self.device, torch.float64)
        self.rhss[f] += zw.T @ t
        self.targets[f] += float((t.pow(2) if weights is None else zw[:, -1:] * t.pow(2)).sum())
        self.counts[f] += z.shape[0]

    def _stacked(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[W^T; b] (d_in + 1, d_out) in float64."""
        as64 = dict(device=self.device, dtype=torch.float64)
        b = bias.to(**as64) if bias is not None else torch.zeros(weight.shape[0], **as64)
        return torch.cat([weight.to(**as64).T, b[None]])

    @staticmethod
    def _residual(a: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, target: float) -> float:
        """sum w ||a^T [z; 1] - t||^2 from the sums of those rows."""
        return float((a * (gram @ a)).sum() - 2 * (a * rhs).sum()) + target

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """sum w ||W z + b - t||^2 / sum w ||t||^2 over the rows added, from the normal equations alone (no pass)."""
        residual = self._residual(self._stacked(weight, bias), self.gram, self.rhs, self.target)
        return max(residual, 0.0) / max(self.target, 1e-300)

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, strength: float) -> torch.Tensor:
        reg = torch.full((self.d_in + 1,), float(strength * gram.diagonal()[:-1].mean()), dtype=torch.float64,
                         device=self.device)
        reg[-1] = 0.0
        return torch.linalg.solve(gram + torch.diag(reg), rhs + reg[:, None] * prior)  # (d_in + 1, d_out)

    def solve(self, weight: torch.Tensor, bias: torch.Tensor | None,
              strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """W', b' minimising sum w ||W' z + b' - t||^2 + lam ||W' - W||^2, lam = strength * mean diagonal of the
        inputs' Gram matrix (a scale-free pull towards the original weights; the bias is free)."""
        solution = self._solve(self.gram, self.rhs, self._stacked(weight, bias), strength)
        return solution[:-1].T, solution[-1]

    def cross_validated(self, weight: torch.Tensor, bias: torch.Tensor | None,
                        strengths: tuple[float, ...] = STRENGTHS) -> float:
        """The strength whose refit, solved on all folds but one, has the least error on the fold left out, summed
        over the folds: the refit has (d_in + 1) x d_out free weights and a few hundred sequences to fit them on, and
        a weak pull lets it fit those sequences' own errors (docs/method.md). An end of the grid that wins says the
        best lies beyond it (a classifier's last layer, fitted at 512 first tokens, chose the strongest on every
        run): the search goes on past it, at the grid's ratio, while the held-out error falls (at most ``BEYOND``
        steps). With one fold, the weakest."""
        finite = all(bool(torch.isfinite(t).all()) for t in (self.grams, self.rhss)) and math.isfinite(self.target)
        if min(self.counts) == 0 or not finite:  # one fold (or one holding every row), or statistics that the
            return strengths[0]  # checks after the refit report: nothing to validate on
        prior = self._stacked(weight, bias)
        gram, rhs = self.gram, self.rhs
        rest = [(gram - self.grams[f], rhs - self.rhss[f]) for f in range(self.folds)]  # every fold but f

        def held_out(strength):
            try:
                return sum(self._residual(self._solve(*rest[f], prior, strength), self.grams[f], self.rhss[f],
                                          self.targets[f]) for f in range(self.folds))
            except torch.linalg.LinAlgError:  # a fold's complement singular at this strength: not a candidate
                return math.inf

        errors = [held_out(strength) for strength in strengths]
        least = min(errors)
        best = strengths[errors.index(least)]
        if len(strengths) < 2 or best not in (strengths[0], strengths[-1]):
            return best
        ratio = (strengths[-1] / strengths[0]) ** (1 / (len(strengths) - 1))  # the grid's step
        end, step = best, ratio if best == strengths[-1] else 1 / ratio
        for k in range(1, BEYOND + 1):
            candidate = float(f"{end * step ** k:.3g}")
            error = held_out(candidate)
            if not error < least:
                break
            best, least = candidate, error
        return best


# ---- the driver -------------------------------------------------------------------------------------------


STREAMS_EQUAL = 1e-5  # relative difference of the two streams below which they are float rounding apart (float32)


@dataclass
class Plan:
    """What the sequential reduction fits, and what it does besides the query/key decomposition."""

    objective: str = "output"  # "output": the attention-output metric (objectives.py); "score": the score error
    compensate: bool = False
    compensation_strength: float | None = None  # the refit's ridge strength; None: cross-validated (Ridge)
    refine_steps: int = 0
    refine_lr: float = 3e-3  # Adam step relative to each parameter's RMS
    first_token_last: bool = False  # the head reads only the first token of the last layer (classifiers)
    reports: list[dict] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)


@dataclass
class LayerAt:
    """One layer's modules, the per-batch rollout weights of its queries (None: every real token alike), whether the
    model reads only the first token of its output (a classifier's last layer), and per batch the gain of the
    LayerNorm after the attention at each token, which pass 1 (``layer_statistics``) measures on the original
    residual sums."""

    layer: nn.Module
    attention: nn.Module
    norm: nn.Module
    weights: list[torch.Tensor] | None
    first_only: bool = False
    gains: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> (B, T) objectives.norm_gain

    def query_weights(self, i: int) -> torch.Tensor:
        """Batch ``i``'s query weights (B, T) under the output objective: rollout weight times the LayerNorm's gain
        (pass 1 must have run)."""
        return self.weights[i] * self.gains[i]


@torch.no_grad()
def reduce_sequential_(model: nn.Module, config: ReductionConfig, dims: list[int], batches: list[dict], plan: Plan,
                       on_progress: Progress | None = None, workdir: str | None = None) -> Plan:
    """Reduce every layer of ``model`` in place, bottom up, on the calibration ``batches`` (tokenizer outputs with
    an attention mask, on the model's device). Fills ``plan.reports`` (one per layer) and ``plan.modified``."""
    if plan.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {plan.objective!r}")
    n_layers = len(model_layers(model))
    device = next(model.parameters()).device
    progress = on_progress or (lambda stage, done, total: None)
    data = [Batch(b, b["attention_mask"].bool()) for b in batches]
    release(_tensors(model))  # whatever read every weight before (loading, checks): from here one layer at a time
    with tempfile.TemporaryDirectory(prefix="mhacompress-calibration-", dir=workdir) as folder:
        spill = embed(model, data, Path(folder))
        weights = token_weights(model, data, spill, plan.first_token_last, device, progress) \
            if plan.objective == "output" else None
        release(_tensors(model))  # the embeddings, read once for every batch
        same = True  # x~ == x until the first reduced layer
        for index in range(n_layers):
            at = layer_at(model, index, None if weights is None else weights[index], plan.first_token_last)
            originals = _tensors(at.layer)  # the original query/key weights too, which solve_qk_ replaces
            targets = plan.compensate or plan.refine_steps > 0
            moments = layer_statistics(model, index, at, data, spill, same, targets, plan, device, progress)
            report = solve_qk_(model, index, config, dims[index], moments, identity=same)
            original, error = None, None  # the projection before any refit (the ridge's prior); the layer's error
            if plan.compensate:
                proj = at.layer.get_submodule(arch_for(model.config).out_proj)
                original = [None if t is None else t.detach().clone() for t in (proj.weight, proj.bias)]
                error, report["compensation_strength"] = compensate_(model, index, at, data, spill, plan, same,
                                                                     device, progress, prior=original)
            if plan.refine_steps:
                with torch.enable_grad():
                    report.update(_refine(model, index, at, data, spill, plan, same, device, progress, error,
                                          original))
            diff = norm = 0.0
            for i, batch in enumerate(data):  # pass 2: the REDUCED layer on x~
                args, kwargs = spill.read_call(i, device)
                xr = spill.read("x" if same else "xr", i, device)
                out = run_layer(at.layer, xr, args, kwargs)
                spill.write("xr_next", i, out)
                if same:  # once the streams differ they stay apart: no reading back the original's outputs
                    target = spill.read("x_next", i, device)
                    diff += float((out - target)[batch.tokens].double().pow(2).sum())
                    norm += float(target[batch.tokens].double().pow(2).sum())
                progress(f"layer {index}: reduced", i + 1, len(data))
            spill.rename("x_next", "x", len(data))
            spill.rename("xr_next", "xr", len(data))
            # still equal when this layer reproduces the original's outputs to float rounding (full key dim): an
            # input map fitted to that rounding noise would move other sequences' outputs (by 9% on a tiny model)
            same = same and diff <= (STREAMS_EQUAL ** 2) * norm
            forget_fused(attention_modules(model)[index][2])  # a copy of the layer's weights (the value's too)
            release(originals)
            trim()
            plan.reports.append(report)
            progress("layers", index + 1, n_layers)
    return plan


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@contextmanager
def one_layer_resident(model: nn.Module):
    """While the block runs, each layer gives back its weights' mapped pages (``release``) as soon as its forward
    is done, and at the end the whole model does (the embeddings, the head): passes through the whole model hold one
    layer's weights resident at a time, not the checkpoint's."""
    def done(module, args, output) -> None:  # returns None: the layer's output stands
        release(_tensors(module))

    hooks = [layer.register_forward_hook(done) for layer in model_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        release(_tensors(model))


def embed(model, data: list[Batch], folder: Path) -> Spill:
    """Depth 0: the embeddings of every batch (the same for both models) and the layers' other call arguments."""
    spill = Spill(folder)
    for i, batch in enumerate(data):
        hidden, args, kwargs = layer_inputs(model, batch.encoding)
        spill.write("x", i, hidden)
        spill.write_call(i, args, kwargs)  # every layer gets the same mask (and position bias)
    return spill


def layer_at(model, index: int, weights, first_token_last: bool = False) -> LayerAt:
    """Layer ``index``'s modules; ``first_token_last``: the model reads only the first token of its last layer."""
    arch = arch_for(model.config)
    layers = model_layers(model)
    return LayerAt(layers[index], attention_modules(model)[index][2], layers[index].get_submodule(arch.norm), weights,
                   first_token_last and index == len(layers) - 1)


def token_weights(model, data: list[Batch], spill: Spill, first_token: bool, device,
                  progress: Progress) -> list[list[torch.Tensor]]:
    """weights[l][batch] (B, T): attention rollout of the ORIGINAL model from what it is read at (objectives.rollout),
    scaled per layer to mean 1 over the real tokens of all batches. One forward pass of the original model."""
    arch = arch_for(model.config)
    _, heads, _ = model_shape(model)
    found = [(layer, attention_modules(model)[i][2]) for i, layer in enumerate(model_layers(model))]
    raw = []
    for i, batch in enumerate(data):
        args, kwargs = spill.read_call(i, device)
        hidden, maps = spill.read("x", i, device), []
        for layer, attention in found:
            hidden, seen = run_recording(layer, {"attention": attention}, hidden, args, kwargs)
            release(_tensors(layer))  # one layer's weights resident at a time, not the whole model's
            maps.append(original_attention(attention, arch, heads, seen["attention"])[0].mean(1))  # (B, T, T)
        raw.append(rollout(maps, readout_weights(batch.tokens, first_token).to(maps[0]), batch.tokens))
        progress("token weights", i + 1, len(data))
    n = sum(int(b.tokens.sum()) for b in data)
    out = []
    for index in range(len(found)):
        total = sum(float(w[index].sum()) for w in raw)
        out.append([w[index] * (n / max(total, 1e-30)) for w in raw])
    return out


def layer_statistics(model, index: int, at: LayerAt, data, spill: Spill, same: bool, targets: bool, plan: Plan,
                     device, progress):
    """Pass 1: the ORIGINAL layer on x (its output, and its residual sum as the target when needed), and the
    statistics of the (x, x~) pair that the objective solves from."""
    arch = arch_for(model.config)
    _, heads, _ = model_shape(model)
    d = getattr(model.config, arch.hidden)
    solver_device = work_device(device)  # statistics and solves (float64): MPS has none, so the CPU there
    if plan.objective == "output":
        moments = OutputMoments(d, heads, solver_device)
        gram = head_gram(at.layer.get_submodule(arch.out_proj).weight.detach().float(), heads)
    else:
        moments = LayerMoments(d, solver_device)
    for i, batch in enumerate(data):
        args, kwargs = spill.read_call(i, device)
        x = spill.read("x", i, device)
        xr = x if same else spill.read("xr", i, device)
        out, seen = run_recording(at.layer, {"attention": at.attention, "norm": at.norm}, x, args, kwargs)
        s = seen["norm"][0][0]  # the original residual sum x + W_O ctx + b
        if targets:
            spill.write("s", i, s)
        spill.write("x_next", i, out)
        if plan.objective == "output":
            at.gains[i] = norm_gain(s, batch.tokens, getattr(at.norm, "eps", 0.0))
            p, v = original_attention(at.attention, arch, heads, seen["attention"])
            w = at.query_weights(i)
            S, share = output_metric(x.float(), p, v, gram.to(p), batch.tokens, w)
            moments.add(x, xr, batch.tokens, w, S, share)
        else:
            moments.add(x, xr, batch.tokens, _queries(batch.tokens, at.first_only))
        progress(f"layer {index}: original", i + 1, len(data))
    return moments


def _queries(tokens: torch.Tensor, first_only: bool) -> torch.Tensor:
    """Query positions (B, T): every real token, or only the first when the head reads nothing else."""
    if not first_only:
        return tokens
    first = torch.zeros_like(tokens)
    first[:, 0] = True
    return first


def solve_qk_(model, index: int, config: ReductionConfig, key_dim: int, moments, identity: bool) -> dict:
    """Decompose layer ``index``'s query/key problem under its objective and install the collaborative module."""
    arch = arch_for(model.config)
    _, heads, _ = model_shape(model)
    old = attention_modules(model)[index][2]
    wq, wk, bq = (None if w is None else w.to(moments.device, torch.float64) for w in qk_weights(old, arch))
    with solving_layer(index, key_dim):
        if isinstance(moments, OutputMoments):
            factors, bias, report = solve_output(wq, bq, wk, heads, key_dim, config, moments, identity)
        else:
            if not identity:
                p = moments.input_map()  # (d, d): x ~ P x~
                wq, wk = wq @ p, wk @ p
            factors, report = decompose_layer(wq, wk, heads, key_dim, config, moments.query_moment(),
                                              moments.key_moment())
            bias = content_bias(wk, bq, heads)
    before = qk_parameters(old, arch)
    new = install_(model, index, config, key_dim, factors, bias)
    return {"index": index, "key_dim": key_dim, **report, "qk_params_before": before,
            "qk_params_after": qk_parameters(new, arch)}


def solve_output(wq, bq, wk, heads: int, key_dim: int, config: ReductionConfig, moments: OutputMoments,
                 identity: bool):
    """Factors, content bias (H, d) and report of one layer under the output objective (float64)."""
    with cpu_threads(1):  # small linear algebra: threads only wait on each other, worse on a busy machine
        wq_w, wk_w, inv_q, inv_k, alpha, key_map = whitened_problem(wq, wk, moments, identity)
        f = methods.get(config.method).solve(wq_w, wk_w, heads, key_dim, **config.solver_options())
        expected, n_iter = f.relative_error, f.n_iter
        f = unwhiten(unscale_heads(f, alpha), inv_q, inv_k)
        mu_o, mu_r = moments.means()
        bias = centred_content_bias(wq, bq, wk, heads, mu_o, f, mu_r, key_map)
        error = relative_error(wq, wk, heads, f)
    return f, bias, {"relative_error": error, "expected_output_error": expected, "n_iter": n_iter,
                     "head_weights": [round(float(a), 4) for a in alpha]}


def row_weights(at: LayerAt, i: int, batch: Batch) -> torch.Tensor:
    """(B, T) float32 weights of the rows the layer's output is fitted at, zero elsewhere: the objective's token
    weights at the real tokens (rollout times the LayerNorm's gain, ``LayerAt.query_weights``); without them (score
    objective) every real token alike, or the first alone where the model reads nothing else (``at.first_only``)."""
    if at.weights is not None:
        return at.query_weights(i).float() * batch.tokens
    return _queries(batch.tokens, at.first_only).float()


def projection_fit(model, index, at: LayerAt, data, spill, plan: Plan, same: bool, device, progress,
                   stage: str) -> Ridge:
    """One pass of the (reduced) layer's attention over the batches: the normal equations of its output projection
    (z: the heads' context; t: the original residual sum minus the input), rows weighted by ``row_weights``. They
    give the compensation's refit, and the relative output error of any projection without another pass
    (``Ridge.error``)."""
    proj = at.layer.get_submodule(arch_for(model.config).out_proj)
    ridge = Ridge(proj.in_features, proj.out_features, work_device(proj.weight.device), folds=min(FOLDS, len(data)))
    for i, batch in enumerate(data):
        args, kwargs = spill.read_call(i, device)
        xr = spill.read("x" if same else "xr", i, device)
        ctx = run_until(at.layer, proj, xr, args, kwargs)  # (B, T, d) the reduced heads' context
        w = row_weights(at, i, batch)
        rows = w > 0
        ridge.add(ctx[rows], (spill.read("s", i, device) - xr)[rows], w[rows], batch=i)
        progress(f"layer {index}: {stage}", i + 1, len(data))
    return ridge


def compensate_(model, index, at: LayerAt, data, spill, plan: Plan, same: bool, device, progress,
                prior: list[torch.Tensor | None] | None = None) -> tuple[float, float]:
    """Refit the attention output projection of the (reduced) layer so that x~ + W_O' ctx~ + b' matches the
    original residual sum s, by ridge least squares (streamed normal equations), rows weighted like the objective;
    pulled towards ``prior`` (weight, bias), by default the projection's current weights, as strongly as
    ``plan.compensation_strength`` says, or by default as cross-validation over the calibration batches chooses
    (``Ridge.cross_validated``). Returns the layer's relative output error after the refit (``output_error``) and
    the strength."""
    arch = arch_for(model.config)
    proj = at.layer.get_submodule(arch.out_proj)
    ridge = projection_fit(model, index, at, data, spill, plan, same, device, progress, "compensation")
    prior = prior or (proj.weight, proj.bias)
    strength = plan.compensation_strength
    if strength is None:
        strength = ridge.cross_validated(*prior)
    weight, bias = ridge.solve(*prior, strength)
    proj.weight.copy_(weight.to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_(bias.to(proj.bias.dtype))
    name = f"{arch.layers}.{index}.{arch.out_proj}"
    if name not in plan.modified:
        plan.modified.append(name)
    return ridge.error(proj.weight, proj.bias), strength  # the error as installed, in the projection's own dtype


def output_error(model, index, at: LayerAt, data, spill, plan: Plan, same: bool, device, progress) -> float:
    """The (reduced) layer's relative output error over the calibration batches, one pass:
    sum w ||x~ + W_O ctx~ + b - s||^2 / sum w ||s - x~||^2, rows weighted by ``row_weights``."""
    proj = at.layer.get_submodule(arch_for(model.config).out_proj)
    ridge = projection_fit(model, index, at, data, spill, plan, same, device, progress, "output error")
    return ridge.error(proj.weight, proj.bias)


HALF = (torch.float16, torch.bfloat16)


@contextmanager
def _in_float32(layer: nn.Module):
    """The layer's float16 and bfloat16 parameters and buffers as float32 while the block runs, then each back in its
    own dtype (exact for the ones left unchanged: float32 holds every half-precision value). The tensors stay the
    same objects (``.data`` is swapped), so an optimizer built inside the block steps them. Yields the tensors that
    were converted: none for a float32 layer, which is left alone."""
    converted = [(t, t.dtype) for t in _tensors(layer) if t.dtype in HALF]
    for t, _ in converted:
        t.data = t.data.float()
    try:
        yield converted
    finally:
        for t, dtype in converted:
            t.data = t.data.to(dtype)


@contextmanager
def _by_formula(module: nn.Module, device: torch.device):
    """On CPU, the collaborative ``module`` computed by its reference formula while the block runs: a refinement step
    (forward and backward) by the formula takes 0.63-0.76 of the time it takes through sdpa, whose CPU kernel needs
    q, k and v padded to one width (BERT-base size, batch 32, key dims 48-192, benchmarks/refine_step.py). Elsewhere
    (GPUs) sdpa's kernels stay."""
    module.by_formula = device.type == "cpu"
    try:
        yield
    finally:
        module.by_formula = False


def _as_float32(value):
    """A call argument with its half-precision tensors (attention masks, position bias) as float32."""
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in HALF else value


class StepSchedule:
    """The refinement's step size, as a factor of its base: raised linearly over the first pass over the ``batches``
    (Adam's first steps move every coordinate by about the full step, which throws a layer fitted in closed form off
    its optimum: the loss rose 4x to 70x over the first pass on two layers of a fine-tuned MiniLM), then halved after
    every later pass whose mean loss is above the pass before (a step too large for the layer). Passes cover every
    batch once, so their means compare like with like."""

    def __init__(self, batches: int):
        self.batches, self.steps, self.scale = batches, 0, 1.0
        self.losses: list[float] = []  # of the pass under way
        self.last: float | None = None  # the mean loss of the previous pass

    @property
    def factor(self) -> float:
        """The factor for the next step."""
        return self.scale * min(1.0, (self.steps + 1) / self.batches)

    def record(self, loss: float) -> None:
        """The loss of the step just taken (before it)."""
        self.steps += 1
        self.losses.append(loss)
        if len(self.losses) < self.batches:
            return
        mean = sum(self.losses) / len(self.losses)
        if self.last is not None and not mean <= self.last:  # rose, or not finite
            self.scale *= 0.5
        self.last, self.losses = mean, []


class RefinementLoss:
    """A refinement step's loss, the layer's weighted output error over a calibration batch, computed from what the
    steps leave unchanged: the value heads (once per batch, spilled), the masks, the weights and the baseline
    ``|target - input|``. A step then costs the keys, the queries and the output projection at the positions the loss
    weighs, and no value projection: 0.89-0.93x the time of a step through the layer (benchmarks/refine_step.py,
    BERT-base size), and for a classifier's last layer, whose head reads the first token alone, one query. It relies
    on what the compensation already does: the target is the residual sum ``x + W_O ctx + b``. Rows are weighted as
    the compensation weighs them (``row_weights``)."""

    def __init__(self, module, at: LayerAt, data: list[Batch], spill: Spill, same: bool, device, as_float32: bool):
        arch = arch_for(module.config)
        self.module, self.proj = module, at.layer.get_submodule(arch.out_proj)
        self.spill, self.device, self.stream, self.as_float32 = spill, device, "x" if same else "xr", as_float32
        signature = inspect.signature(module.forward)
        self.masks, self.weights, self.positions, self.baselines = [], [], [], []
        with torch.no_grad():
            for i, batch in enumerate(data):
                self._prepare(i, row_weights(at, i, batch), at.layer, signature)

    def _prepare(self, i: int, w: torch.Tensor, layer: nn.Module, signature: inspect.Signature) -> None:
        args, kwargs = self.spill.read_call(i, self.device)
        if self.as_float32:
            args, kwargs = tuple(map(_as_float32, args)), {k: _as_float32(v) for k, v in kwargs.items()}
        xr = self._input(i)
        seen = call_of(self.module, lambda: run_layer(layer, xr, args, kwargs))  # the layer up to its attention
        call = signature.bind(*seen[0], **seen[1]).arguments
        self.masks.append(tuple(_as_float32(m) if self.as_float32 else m
                                for m in (call.get("attention_mask"), call.get("position_bias"))))
        self.spill.write("v", i, self.module.value_heads(xr))  # (B, H, T, dh)
        rows = torch.nonzero(w.sum(0) > 0).flatten()  # the positions the loss weighs (P,)
        target = self.spill.read("s", i, self.device)[:, rows].float()
        self.weights.append(w[:, rows])
        self.positions.append(rows)
        self.baselines.append(float((w[:, rows, None] * (target - xr[:, rows].float()).pow(2)).sum()))

    def _input(self, i: int) -> torch.Tensor:
        xr = self.spill.read(self.stream, i, self.device)
        return xr.float() if self.as_float32 else xr

    def __call__(self, i: int) -> torch.Tensor:
        """Batch ``i``'s error relative to its baseline, differentiable in the query/key parameters."""
        rows, xr = self.positions[i], self._input(i)
        mask, bias = self.masks[i]
        ctx, _ = self.module.reference(xr, mask, bias, queries=rows, values=self.spill.read("v", i, self.device))
        out = (xr[:, rows] + self.proj(ctx)).float()  # the residual sum at those positions (B, P, d)
        target = self.spill.read("s", i, self.device)[:, rows].float()
        return (self.weights[i][..., None] * (out - target).pow(2)).sum() / max(self.baselines[i], 1e-30)


def _refine(model, index, at: LayerAt, data, spill, plan: Plan, same: bool, device, progress: Progress,
            before: float | None = None, prior: list[torch.Tensor | None] | None = None) -> dict:
    """Adam steps on the layer's query/key parameters so that its residual sum matches the original's, the step size
    warmed up and halved as ``StepSchedule`` says; with ``plan.compensate`` the output projection is then refitted to
    the refined scores (towards ``prior``, as before the steps). Kept only when they lower the layer's output error
    over the calibration batches (``before``, that of the closed form: measured here when not given): a step size
    that diverges on some model gives the closed form back (report: ``refined`` false). The errors come from the
    normal equations of the pass that refits the projection (``projection_fit``), so judging the steps costs no pass
    of its own with compensation, and two without (before and after).

    A half-precision layer takes its steps as float32 (``_in_float32``) and is judged as it will run, in its own
    dtype: Adam on float16 parameters divides by squared gradients that underflow to 0 (NaN steps: never kept), and
    bfloat16 rounds small steps away. The errors are summed in float64."""
    module = attention_modules(model)[index][2]
    proj = at.layer.get_submodule(arch_for(model.config).out_proj)
    params = [module.query_proj.weight, module.key_proj.weight, module.content_bias.weight]
    params += [module.mixing] if module.mixing is not None else []
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # steps relative to each tensor's RMS: after whitening, the query and key factors differ in scale by orders
    rms = [float(p.detach().float().pow(2).mean().sqrt()) for p in params]
    try:
        with torch.no_grad():
            if before is None:
                before = output_error(model, index, at, data, spill, plan, same, device, progress)
            changed = [t for t in (*params, proj.weight, proj.bias) if t is not None]  # by the steps and the refit
            start = [t.detach().clone() for t in changed]
        with _by_formula(module, device), _in_float32(at.layer) as converted:
            step_loss = RefinementLoss(module, at, data, spill, same, device, bool(converted))
            sizes = [plan.refine_lr * r + 1e-12 for r in rms]
            optimizer = torch.optim.Adam([{"params": [p], "lr": 0.0} for p in params])
            schedule = StepSchedule(len(data))
            for step in range(plan.refine_steps):
                for group, size in zip(optimizer.param_groups, sizes):
                    group["lr"] = size * schedule.factor
                loss = step_loss(step % len(data))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.record(float(loss.detach()))
                progress(f"layer {index}: refinement", step + 1, plan.refine_steps)
            for p in params:  # gradients outliving the steps: memory held after the reduction, pickled with the
                p.grad = None  # model, and float32 ones on half parameters
        with torch.no_grad():
            after = compensate_(model, index, at, data, spill, plan, same, device, progress, prior=prior)[0] \
                if plan.compensate else output_error(model, index, at, data, spill, plan, same, device, progress)
            kept = math.isfinite(after) and after < before
            if not kept:
                for t, value in zip(changed, start):
                    t.copy_(value)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return {"output_error_before": before ** 0.5, "output_error_after": (after if kept else before) ** 0.5,
            "refined": kept}
