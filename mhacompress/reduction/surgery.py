"""In-place model surgery: decompose a layer's W_q, W_k and install collaborative attention in its place (torchao
style: ``reduce_(model, config)``), layer by layer so that the original query/key weights are freed as we go."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from ..devices import cpu_threads, parallel_map, work_device
from ..errors import UsageError, check_callback, named
from ..residency import release
from . import methods
from .calibrate import unwhiten, whiten
from .config import ConfigError, ReductionConfig, compression_block
from .decompose import Factors, relative_error, solving_layer
from .modeling import (
    COMPRESSION_KEY,
    Arch,
    CollaborativeSelfAttention,
    UnsupportedModelError,
    arch_for,
    attention_modules,
    base_model_type,
    collaborative_module,
    first_token_only_,
    is_classifier,
    promote_,
)


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of a supported model."""
    arch = arch_for(model.config)
    heads, hidden = getattr(model.config, arch.heads), getattr(model.config, arch.hidden)
    return len(attention_modules(model)), heads, hidden // heads


class AlreadyReducedError(UsageError, ValueError):
    """The model (or one of its layers) is already collaborative."""


class UnsupportedArchitectureError(UsageError, UnsupportedModelError):
    """An architecture the table has no entry for, raised by the library's entry points: a UsageError like every
    other bad input (``UnsupportedModelError`` itself lives in the modelling code that saved folders carry, which
    cannot import mhacompress)."""


def check_reducible(model: nn.Module, in_place: bool = False) -> None:
    """A model of an unsupported architecture, or one already reduced (wholly or partly), is refused, and so are
    weights the reduction cannot read or (``in_place``) change: ``check_loaded_weights``."""
    try:
        arch_for(model.config)
    except UnsupportedModelError as err:
        raise UnsupportedArchitectureError(str(err)) from None
    check_not_partly_reduced(model)
    if getattr(model.config, COMPRESSION_KEY, None):
        raise AlreadyReducedError("this model is already reduced; reduce the original checkpoint instead")
    name = type(model).__name__
    if not (name.endswith("Model") or is_classifier(model)):  # what a saved folder can be (hub.check_block)
        raise UnsupportedArchitectureError(f"a {name} cannot be reduced: only encoders (e.g. BertModel) and sequence "
                                           f"classifiers are supported; reduce its encoder, {_inner(model)}, instead")
    check_loaded_weights(model, in_place)
    check_finite_weights(model)


def _inner(model: nn.Module) -> str:
    """Where a wrapper keeps the encoder to reduce: a SentenceTransformer its first module's ``auto_model``, a
    ``torch.compile``d model the original module, anything else (a masked-LM model) its ``base_model``."""
    name = type(model).__name__
    if name == "SentenceTransformer":
        return "model[0].auto_model"
    return "model._orig_mod" if name == "OptimizedModule" else "model.base_model"


def check_loaded_weights(model: nn.Module, in_place: bool = False) -> None:
    """Weights that are not there (the meta device: a model built empty) are refused before any layer is touched,
    and so are weights that cannot be changed in place (inference tensors: a model built inside
    torch.inference_mode) where the reduction changes some (``in_place``: the compensation refits the output
    projections)."""
    quantized = next((name for name, m in model.named_modules() if isinstance(m, nn.Module)
                      and not isinstance(getattr(m, "weight", None), (torch.Tensor, type(None)))), None)
    if quantized is not None:  # torch.ao's dynamic quantization: weight() is a method, packed int8 inside
        raise UsageError(f"the model is quantized ({quantized} holds packed weights, not a weight tensor), and the "
                         f"reduction reads and writes floating-point weights; reduce the float model, then quantize "
                         f"the reduced one")
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise UsageError("the model's weights are on the meta device (built without its weights); load them first, "
                         "e.g. AutoModel.from_pretrained(...), then reduce it")
    if in_place and any(p.is_inference() for p in params):
        raise UsageError("the model's weights are inference tensors (built inside torch.inference_mode()), which "
                         "the calibrated reduction cannot change in place; build it outside inference_mode")


def check_not_partly_reduced(model: nn.Module) -> None:
    """Collaborative layers without the compression block that a finished reduction writes: a reduction stopped
    half-way (Ctrl-C in a notebook, an error) left the model in place with some layers reduced and some not. Neither
    reduced again nor saved (its folder would reload with those layers' query/key weights missing, made up at
    random)."""
    if not getattr(model.config, COMPRESSION_KEY, None) and any(
            isinstance(m, CollaborativeSelfAttention) for m in model.modules()):
        raise AlreadyReducedError("this model holds the layers of a reduction that did not finish (it reduces in "
                                  "place, and was stopped half-way); load the original checkpoint again and reduce "
                                  "that")


def check_finite_weights(model: nn.Module, name: str = "the model") -> None:
    """NaN or infinite weights (a damaged or diverged checkpoint) are refused before any work: the solvers would
    fail deep inside their linear algebra."""
    weight = nonfinite_weight(model)
    if weight is not None:
        raise UsageError(f"{name}'s weight {weight} holds NaN or infinite values: the checkpoint is damaged (or "
                         f"its training diverged); download or save it again")


def nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None."""
    return next(nonfinite_weights(model), None)


def nonfinite_weights(model: nn.Module) -> Iterator[str]:
    """The names of the parameters holding NaN or inf, in order. amax/amin, not isfinite: no bool copy of a large
    embedding; and each weight's memory-mapped pages are given back once read (``residency.release``), so the check
    does not leave the whole checkpoint resident."""
    named_parameters = list(model.named_parameters())
    try:
        for name, p in named_parameters:
            checked = p.numel() and p.is_floating_point()
            finite = not checked or bool(torch.isfinite(p.amax()) and torch.isfinite(p.amin()))
            release([p])  # one weight resident at a time
            if not finite:
                yield name
    finally:  # and the pages that reading the next weight mapped back around each one (the kernel's fault-around)
        release([p for _, p in named_parameters])


def require_classifier(model: nn.Module, name: str) -> None:
    """The [CLS] shortcut is exact only for heads that read the first token alone: sequence classifiers."""
    if not is_classifier(model):
        kind = type(model).__name__.removeprefix("Collaborative")
        raise ConfigError(f"{named('--first-token-only')} is for sequence classifiers (their head reads only "
                          f"[CLS]); {name} holds a {kind}: drop it")


def content_bias(wk: torch.Tensor, bq: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """Row h: W_k^h^T b_q^h (H, d), the key-dependent part of the query bias, kept exactly."""
    d_out, d = wk.shape
    if bq is None:
        return wk.new_zeros(num_heads, d)
    return torch.einsum("hid,hi->hd", wk.reshape(num_heads, d_out // num_heads, d), bq.reshape(num_heads, -1))


def qk_weights(module: nn.Module, arch: Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W_q, W_k (H*dh, d) and b_q of an original self-attention module, detached."""
    q, k = getattr(module, arch.query), getattr(module, arch.key)
    return q.weight.detach(), k.weight.detach(), None if q.bias is None else q.bias.detach()


def qk_parameters(module: nn.Module, arch: Arch) -> int:
    """Parameters that score tokens: W_q, W_k and their biases, or the collaborative projections, mixing and
    content bias."""
    if isinstance(module, CollaborativeSelfAttention):
        parts = [module.query_proj, module.key_proj, module.content_bias]
        mixing = module.mixing.numel() if module.mixing is not None else 0
        return sum(p.numel() for m in parts for p in m.parameters()) + mixing
    return sum(p.numel() for name in (arch.query, arch.key) for p in getattr(module, name).parameters())


@torch.no_grad()
def fill_(module: CollaborativeSelfAttention, method: str, factors: Factors, bias: torch.Tensor) -> None:
    """Copy a layer's factors and content bias (H, d) into its (freshly built) collaborative module."""
    query, key, mixing = methods.get(method).module_weights(factors)
    dtype = module.query_proj.weight.dtype
    module.query_proj.weight.copy_(query.to(dtype))
    module.key_proj.weight.copy_(key.to(dtype))
    module.content_bias.weight.copy_(bias.to(dtype))
    if module.mixing is not None:
        module.mixing.copy_(mixing.to(dtype))


def decompose_layer(wq: torch.Tensor, wk: torch.Tensor, heads: int, key_dim: int, config: ReductionConfig,
                    moment: torch.Tensor | None = None,
                    key_moment: torch.Tensor | None = None) -> tuple[Factors, dict]:
    """One layer's factors and report; with second moments, solved in the whitened space and mapped back
    (``moment`` whitens the query side, ``key_moment`` the key side; default: the same for both)."""
    with cpu_threads(1):  # small linear algebra: threads only wait on each other, worse on a busy machine
        return _decompose_layer(wq, wk, heads, key_dim, config, moment, key_moment)


def _decompose_layer(wq, wk, heads, key_dim, config, moment, key_moment) -> tuple[Factors, dict]:
    method = methods.get(config.method)
    if moment is None:
        f = method.solve(wq, wk, heads, key_dim, **config.solver_options())
        return f, {"relative_error": f.relative_error, "n_iter": f.n_iter}
    wq_white, wk_white, inv_q, inv_k = whiten(wq, wk, moment, key_moment)
    f = method.solve(wq_white, wk_white, heads, key_dim, **config.solver_options())
    expected = f.relative_error
    f = unwhiten(f, inv_q, inv_k)
    return f, {"relative_error": relative_error(wq.double(), wk.double(), heads, f), "expected_score_error": expected,
               "n_iter": f.n_iter}


def install_(model: nn.Module, index: int, config: ReductionConfig, key_dim: int, factors: Factors,
             bias: torch.Tensor) -> CollaborativeSelfAttention:
    """Swap layer ``index``'s self-attention for a collaborative module holding ``factors`` and the content bias."""
    parent, name, old = attention_modules(model)[index]
    new = collaborative_module(old, model.config, methods.get(config.method).layout, key_dim)
    fill_(new, config.method, factors, bias)
    if not any(p.requires_grad for p in old.parameters()):  # a frozen encoder stays frozen
        new.requires_grad_(False)
    setattr(parent, name, new)
    return new


def reduce_layers_(model: nn.Module, config: ReductionConfig, dims: list[int],
                   moments: list[torch.Tensor] | None = None,
                   on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """Decompose every layer (in parallel: one single-threaded solver per core, see devices.parallel_map) and
    install each as soon as it is solved, in this thread; the per-layer reports, in order."""
    arch = arch_for(model.config)
    _, heads, _ = model_shape(model)
    device = work_device(next(model.parameters()).device)  # MPS has no float64: its solvers run on the CPU
    weights = [tuple(None if w is None else w.to(device) for w in qk_weights(m, arch))
               for _, _, m in attention_modules(model)]  # (W_q, W_k, b_q) per layer
    reports: list[dict] = [{} for _ in weights]

    def solve(index: int) -> tuple[Factors, dict]:
        wq, wk, _ = weights[index]
        with solving_layer(index, dims[index]):
            return decompose_layer(wq, wk, heads, dims[index], config, None if moments is None else moments[index])

    def install(index: int, solved: tuple[Factors, dict]) -> None:
        (factors, report), (_, wk, bq) = solved, weights[index]
        old = attention_modules(model)[index][2]
        before = qk_parameters(old, arch)
        new = install_(model, index, config, dims[index], factors, content_bias(wk.double(), _double(bq), heads))
        reports[index] = {"index": index, "key_dim": dims[index], **report, "qk_params_before": before,
                          "qk_params_after": qk_parameters(new, arch)}
        weights[index] = None  # the original query/key weights can go
        if on_layer:
            on_layer(reports[index])

    parallel_map(solve, range(len(weights)), device=device, on_done=install)
    return reports


def reduce_(model: nn.Module, config: ReductionConfig, *, source: str | os.PathLike = "", tool_version: str = "",
            moments: list[torch.Tensor] | None = None, on_layer: Callable[[dict], None] | None = None) -> dict:
    """Replace every self-attention layer of ``model`` by collaborative attention, in place.

    Returns the compression block (also stored as ``model.config.compression``): per layer its key dim, the relative
    error of its score tensor, solver iterations, and Q/K parameters before and after. Afterwards
    ``model.save_pretrained(dir)`` writes a folder that reloads as the reduced model. ``on_layer`` is called after
    each layer (progress).

    ``moments``: per-layer input second moments (calibrate.second_moments) of the ORIGINAL model; each layer is then
    decomposed in the whitened space, which minimises the expected score error on the calibration data (the report
    adds it as ``expected_score_error``). For the sequential, output-aware path use ``mhacompress.compress(...)``.
    This is the core of `mhacompress reduce --weights-only` on a model already in memory; ``compress`` is the whole
    command.
    """
    _check_arguments(model, config, moments, on_layer)
    if isinstance(source, os.PathLike):  # recorded in the block, which is saved as JSON
        source = os.fspath(source)
    for name, value, what in (("source", source, "the name or folder of the original (a str or Path)"),
                              ("tool_version", tool_version, "a str")):
        if not isinstance(value, str):
            raise UsageError(f"{name} is recorded in the compression block and must be {what}; got "
                             f"{type(value).__name__}")
    check_reducible(model)
    if config.first_token_only:
        require_classifier(model, "this model")
    if hooks := hooked_attention(model):
        warnings.warn(hooks, stacklevel=2)
    n_layers, heads, head_dim = model_shape(model)
    config = config.decided(heads * head_dim, n_layers)  # recorded as decided (allocate False: no data)
    dims = config.layer_key_dims(n_layers, heads, head_dim)
    if moments is not None and len(moments) != n_layers:
        raise ConfigError(f"{len(moments)} second moments given for {n_layers} layers; pass one per layer "
                          f"(calibrate.second_moments(model, batches))")
    _check_moments(model, moments)
    with torch.inference_mode(False):  # called inside inference_mode, the installed modules' caches would fail
        layers = reduce_layers_(model, config, dims, moments, on_layer)
    return finish_(model, config, layers, source=source, tool_version=tool_version)


def hooked_attention(model: nn.Module) -> str | None:
    """What to tell the caller who registered hooks on a self-attention module, which the reduction replaces by a new
    module: they would stop firing without a word. None when there are none."""
    hooked = [i for i, (_, _, m) in enumerate(attention_modules(model))
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
    if not hooked:
        return None
    return (f"the self-attention modules of layers {hooked} had hooks, which do not carry over to the collaborative "
            f"modules that replace them; register them again on the reduced model's attention modules")


def _check_arguments(model, config, moments, on_layer) -> None:
    """reduce_'s arguments of the wrong kind, refused in one line before any layer is touched (not an
    AttributeError deep inside); a config whose calibration reduce_ would not apply (but record) is refused too."""
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "model_type"):
        raise UsageError(f"reduce_ takes a transformers model (e.g. AutoModel.from_pretrained(...)); got "
                         f"{type(model).__name__}; for a folder or hub id use mhacompress.compress(name, config)")
    if not isinstance(config, ReductionConfig):
        raise ConfigError(f"config must be a ReductionConfig, e.g. ReductionConfig(key_dim=96); got "
                          f"{type(config).__name__}")
    if config.calibration is not None:
        raise ConfigError("reduce_ reduces from the weights alone and would ignore config.calibration (yet record "
                          "it); calibrate with mhacompress.compress(model, config, tokenizer=tokenizer), or drop "
                          "calibration")
    if moments is not None and (not isinstance(moments, (list, tuple))
                                or not all(isinstance(m, torch.Tensor) for m in moments)):
        raise ConfigError("moments must be a list of tensors, one per layer (calibrate.second_moments(model, "
                          "batches))")
    check_callback("on_layer", on_layer, "a layer's report")


def _check_moments(model: nn.Module, moments) -> None:
    """Each layer's second moment is (d, d) of its input, and finite: else the whitening's matmul or the solver fails
    from inside the reduction."""
    arch = arch_for(model.config)
    for i, (moment, (_, _, module)) in enumerate(zip(moments or (), attention_modules(model))):
        d = qk_weights(module, arch)[0].shape[1]
        if tuple(moment.shape) != (d, d):
            raise ConfigError(f"second moment {i} has shape {tuple(moment.shape)}; each is ({d}, {d}), of its layer's "
                              f"input (calibrate.second_moments(model, batches) of this model)")
        if not moment.is_floating_point():  # a complex one lost its imaginary part; a bool one is no moment
            raise ConfigError(f"second moment {i} is a {moment.dtype} tensor; each is a real floating-point (d, d) "
                              f"tensor (calibrate.second_moments(model, batches))")
        if not torch.isfinite(moment).all():
            raise ConfigError(f"second moment {i} holds NaN or infinite values; compute it again with "
                              f"calibrate.second_moments(model, batches)")
        if not moment.diagonal().sum() > 0:  # all zero (no tokens): its whitening divides by zero, NaN weights
            raise ConfigError(f"second moment {i} is zero (or has no positive trace), the moment of no tokens; "
                              f"compute it with calibrate.second_moments(model, batches) over real text")


def finish_(model: nn.Module, config: ReductionConfig, layers: list[dict], *, source: str, tool_version: str,
            modified: list[str] = ()) -> dict:
    """Record the compression block on the model and give it the classes of a reduced model; the block."""
    block = compression_block(config, source=source, layers=layers, tool_version=tool_version,
                              base_architecture=type(model).__name__, base_model_type=base_model_type(model.config),
                              modified=modified)
    setattr(model.config, COMPRESSION_KEY, block)
    promote_(model)
    if config.first_token_only:
        first_token_only_(model)
    return block


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()
