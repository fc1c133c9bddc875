"""Export a reduced model to ONNX, checked in onnxruntime against PyTorch before anything is written.

The file is traced with torch.export (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``) with dynamic
batch and sequence axes, written to a temporary sibling, run in onnxruntime on padded batches of several shapes, and
renamed into place only when every output matches PyTorch within ``tol``. Library code: returns the check, never
prints.
"""

from __future__ import annotations

import os

from . import fsio
from .errors import ConfigError, UsageError, given, imported, named

FORMATS = ("onnx",)
INPUTS = ("input_ids", "attention_mask")  # every graph's; token_type_ids too where the model has segments
CHECK_SHAPES = ((1, 5), (2, 16), (3, 37))  # (batch, seq) of the check: none is the traced example shape


def input_names(model) -> list[str]:
    """The graph's inputs: ``token_type_ids`` as well for a model with more than one segment embedding (BERT, ELECTRA,
    ERNIE: a pair classifier scores its second sentence as segment 1; with segment 0 fixed in the graph its logits
    differ from PyTorch's)."""
    return list(INPUTS) + (["token_type_ids"] if getattr(model.config, "type_vocab_size", 0) > 1 else [])


def output_names(model) -> list[str]:
    """What the exported graph returns: logits for classifiers, hidden states (and the pooler's) for encoders."""
    from .reduction.modeling import is_classifier

    if is_classifier(model):
        return ["logits"]
    return ["last_hidden_state"] + (["pooler_output"] if getattr(model, "pooler", None) is not None else [])


def _wrapper(model, names):
    import torch

    class Wrapped(torch.nn.Module):
        """(input_ids, attention_mask[, token_type_ids]) -> named output tensors: a plain signature for the tracer."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **segments)
            return tuple(out[n] for n in names)

    return Wrapped().eval()


def padded_batch(vocab_size: int, batch_size: int, seq_len: int, *, seed: int = 0, inputs=INPUTS) -> dict:
    """Random ids (B, T) whose rows are right-padded to different lengths (row 0 is full); with ``token_type_ids``
    in ``inputs``, each row's second half of real tokens is segment 1, as a sentence pair's second sentence."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)  # (B, T)
    lengths = torch.linspace(seq_len, max(1, seq_len // 3), batch_size).round().long()  # (B,)
    positions = torch.arange(seq_len)[None, :]  # (1, T)
    mask = (positions < lengths[:, None]).long()  # (B, T)
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if "token_type_ids" in inputs:
        batch["token_type_ids"] = ((positions >= (lengths[:, None] + 1) // 2) & mask.bool()).long()  # (B, T)
    return batch


def max_opset() -> int:
    """The newest ONNX opset the installed exporter can write: torch.onnx converts its graph with onnxscript's version
    converter, which (falling back to onnx's) fails, with a traceback in its log, above this."""
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
    except ImportError:  # another onnxscript layout: what the onnx package itself knows
        import onnx

        return int(onnx.defs.onnx_opset_version())
    return int(SUPPORTED_MAX_ONNX_OPSET)


def check_settings(*, opset, tol) -> tuple[int, float]:
    """--opset and --tolerance, refused in one line before anything loads: an opset the exporter cannot write, a
    tolerance that is not a finite number >= 0 (inf would let any graph pass the check). Returns them as Python
    numbers (a numpy scalar as the int or float it holds)."""
    import math

    from .reduction.config import _plain

    opset, tol = _plain(opset), _plain(tol)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"{named('--tolerance')} must be a finite non-negative number (e.g. 1e-4), got {tol!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise ConfigError(f"{named('--opset')} must be an integer >= 17 (torch.onnx's exporter), got {opset!r}; pass "
                          f"{given('--opset', 18)}")
    top = max_opset()
    if opset > top:
        raise ConfigError(f"{given('--opset', opset)} is newer than the installed exporter can write (17..{top}); "
                          f"pass {given('--opset', top)} or less")
    return opset, tol


EXPORT_HINT = "pip install 'mhacompress[export]'"


def _onnxruntime():
    return imported("onnxruntime", f"cannot check the export: onnxruntime is not installed, so nothing was written; "
                                   f"{EXPORT_HINT}", EXPORT_HINT)


def check(path: str | os.PathLike, model, names: list[str], *, tol: float = 1e-4, shapes=CHECK_SHAPES) -> dict:
    """Run the ONNX file in onnxruntime and PyTorch on padded batches; max abs difference per shape and output."""
    import numpy as np
    import torch

    from .reduction.modeling import max_tokens

    ort = _onnxruntime()
    wrapped, rows = _wrapper(model, names), []
    limit = max_tokens(model)  # a model with fewer positions than a check shape is checked at its longest
    shapes = list(dict.fromkeys((b, t if limit is None else min(t, limit)) for b, t in shapes))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise UsageError(f"onnxruntime cannot load the exported graph, so nothing was written: "
                         f"{str(err).splitlines()[0][:200]}{_half_hint(model)}") from None
    for batch_size, seq_len in shapes:
        batch = padded_batch(model.config.vocab_size, batch_size, seq_len, seed=seq_len, inputs=input_names(model))
        got = session.run(names, {k: v.numpy() for k, v in batch.items()})
        with torch.inference_mode():
            want = wrapped(**batch)
        for name, a, b in zip(names, got, want):
            b = b.float().numpy()
            diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            rows.append({"batch_size": batch_size, "seq_len": seq_len, "output": name, "shape": list(a.shape),
                         "max_abs_diff": diff})
    worst = max(r["max_abs_diff"] for r in rows)
    return {"tolerance": tol, "max_abs_diff": worst, "passed": worst <= tol, "runs": rows}


def _half_hint(model) -> str:
    """What to do about a half-precision model: onnxruntime's CPU kernels lack bfloat16 for most operators, and
    float16 rounds differently there than in PyTorch (about 4e-3 on a tiny BERT)."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return ("; the model is bfloat16, which onnxruntime's CPU kernels do not run: export a float32 copy "
                "(model.float(), saved) instead")
    if dtype == torch.float16:
        return (f"; the model is float16, which rounds differently in onnxruntime: pass "
                f"{given('--tolerance', 0.01, 'tol')}, or export a float32 copy")
    return ""


def export_onnx(model, output: str | os.PathLike, *, opset: int = 18, tol: float = 1e-4, force: bool = False,
                source: str | os.PathLike | None = None) -> dict:
    """Export ``model`` (eval mode, CPU) to ``output``; the file exists afterwards only if the check passed. An
    existing file is replaced only with ``force`` (and then only once the new one passed); an output inside
    ``source`` or the folder the model was loaded from is refused (see ``hub.check_output``)."""
    import torch

    from .hub import check_output

    opset, tol = check_settings(opset=opset, tol=tol)
    imported("onnxscript", f"ONNX export needs onnxscript: {EXPORT_HINT}", EXPORT_HINT)  # torch.onnx's exporter's
    _onnxruntime()  # an export that cannot be checked is not attempted
    target = check_output(output, force, kind="file",
                          sources=[source, getattr(model.config, "_name_or_path", None)])
    names, inputs = output_names(model), input_names(model)
    model = model.eval()
    from .reduction.modeling import max_tokens

    example = padded_batch(model.config.vocab_size, 2, min(8, max_tokens(model) or 8), inputs=inputs)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=100_000)
    try:
        with fsio.temp_file(target, ".onnx") as tmp:
            with torch.inference_mode(False), torch.no_grad(), _quiet():
                torch.onnx.export(_wrapper(model, names), tuple(example[k] for k in inputs), str(tmp),
                                  dynamo=True, external_data=False, opset_version=opset, input_names=inputs,
                                  output_names=names, dynamic_shapes={k: {0: batch, 1: seq} for k in inputs})
            result = check(tmp, model, names, tol=tol)
            if not result["passed"]:
                raise UsageError(f"onnxruntime differs from PyTorch by {result['max_abs_diff']:.2e} > {tol:g}; "
                                 f"nothing was written{_half_hint(model)}")
            fsio.replace(tmp, target)
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(output)) from None  # onnx's write errors name no file
    finally:
        fsio.release(target)
    return {"output": str(output), "format": "onnx", "opset": opset, "inputs": inputs, "outputs": names,
            "dynamic_axes": {k: ["batch", "sequence"] for k in inputs}, "bytes": target.stat().st_size, **result}


def _quiet():
    """torch.onnx's exporter reports its progress with print and warnings: keep library code silent."""
    import contextlib
    import io
    import logging
    import warnings

    stack = contextlib.ExitStack()
    for name in ("torch.onnx", "onnxscript"):  # onnxscript logs its version converter's fallbacks, tracebacks too
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR if name == "torch.onnx" else logging.CRITICAL)
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack
