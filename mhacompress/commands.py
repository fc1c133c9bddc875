"""The commands besides `reduce` as one Python call each, returning the dict their ``--json`` prints (without the
schema envelope of schema_version, versions and device):

    import mhacompress
    mhacompress.evaluate("out/minilm-cp96", "stsb", data_dir="glue_data")   # mhacompress eval
    mhacompress.report("out/minilm-cp96", batch_size=1)                      # mhacompress report
    mhacompress.to_onnx("out/minilm-cp96", "out/minilm-cp96.onnx")           # mhacompress export
    mhacompress.finetune("minilm", "mrpc", "out/minilm-mrpc", data_dir="glue_data")  # mhacompress finetune
    mhacompress.analyze("minilm", plot="out/analyze-minilm")                 # mhacompress analyze

(``compress``, in pipeline.py, is `reduce`; ``run_sweep``, in sweep.py, is `sweep`.) Progress is a callback of
``Progress`` events, as for ``compress``; nothing here prints. Bad input raises ``UsageError`` with the one line the
CLI shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import fsio
from .errors import ConfigError, UsageError, given, memory_refused, named
from .pipeline import Progress, notifier

OnProgress = Callable[[Progress], None] | None


@memory_refused("--batch-size", "--limit")  # OOM: the command's line, naming these
def evaluate(model, task: str, *, split: str = "validation", data_dir: str | None = None,
             limit: int | None = None, batch_size: int = 64, max_length: int = 128, device: str = "auto",
             reference=None, first_token_only: bool = False, allow_pickle: bool = False,
             tokenizer=None, on_progress: OnProgress = None) -> dict:
    """Score ``model`` (a folder, hub id or alias: original, fine-tuned or reduced) on a GLUE task's ``split`` with
    the task's official metrics; with ``reference``, also the label-free fidelity to that model. `mhacompress eval`
    in one call: returns what ``eval --json`` prints, less the envelope.

    ``model`` and ``reference`` may also be transformers models in memory (``compress(...).model``, a model reduced
    by ``reduce_``), scored as they are, with ``tokenizer`` (a reference in memory shares it): where their weights
    are, or moved to an explicit ``device``, as ``compress`` moves one."""
    from .devices import is_auto, resolve_device
    from .eval.compare import Scorer
    from .eval.compare import evaluate as score
    from .hub import load_pretrained
    from .reduction.modeling import is_classifier
    from .reduction.surgery import check_finite_weights

    named_models = {"model": model, "reference": reference}
    in_memory = check_in_memory(named_models, tokenizer, first_token_only)
    notify = checked_call(on_progress, {"first_token_only": first_token_only},
                          in_memory="a transformers model with tokenizer=",
                          **{k: v for k, v in named_models.items() if k not in in_memory})
    moved = not is_auto(device)  # a model in memory stays where it is unless a device is named
    device = str(resolve_device(device))  # 'auto' (the command's default) too; a device this machine lacks fails now
    if "model" in in_memory and not moved:
        device = str(next(model.parameters()).device)
    scorer = Scorer.for_task(task, split, data_dir=data_dir, limit=limit, batch_size=batch_size,
                             max_length=max_length, device=device)
    if scorer.examples.labels is None and reference is None:  # refused before any model loads
        raise UsageError(f"{scorer.examples.source} has no labels, so there is nothing to score; evaluate "
                         f"{given('--split', 'validation')}, or pass {given('--reference', 'ORIGINAL')} for "
                         f"label-free fidelity on these texts")

    def loaded(option: str, value):  # (model, tokenizer, name)
        if option in in_memory:
            return value.to(device).eval(), tokenizer, in_memory[option]
        notify(Progress(f"loading {value}"))
        return (*load_pretrained(str(value), allow_pickle=allow_pickle, device=device)[:2], str(value))

    scored, scored_tokenizer, name = loaded("model", model)
    ref = None if reference is None else loaded("reference", reference)
    for checked in (scored, *(ref[:1] if ref else ())):  # NaN weights would score null metrics, exit 0
        check_finite_weights(checked)
    if first_token_only:
        first_token_shortcut(scored, name)
    stage = f"{scorer.task.name} [{scorer.examples.split}]"
    total = len(scorer.examples) * (1 if is_classifier(scored) else len(scorer.examples.texts[0])) * (2 if ref else 1)
    done = [0]

    def batch_scored(n: int) -> None:
        done[0] += n
        notify(Progress(stage, done[0], total))

    scorer.on_batch = batch_scored
    return score(scored, scored_tokenizer, scorer, model_name=name, reference=ref)


@memory_refused("--batch-size", "--seq-len")
def report(model, *, seq_len: int = 128, batch_size: int = 32, key_dim: int | None = None,
           method: str | None = None, repeats: int = 7, latency: bool = True, first_token_only: bool = False,
           attn_implementation: str = "sdpa", device: str = "auto", allow_pickle: bool = False,
           reference=None, on_progress: OnProgress = None) -> dict:
    """Q/K parameters and multiply-adds of a reduced ``model`` against its original, per layer and in total, and
    (``latency``) their measured medians side by side with ratios. ``model`` is a reduced folder (its original is
    reloaded from the source it records), or an original with ``key_dim`` to reduce it in memory.
    `mhacompress report` in one call (``latency=False`` is ``--no-latency``): returns what ``report --json`` prints,
    less the envelope.

    ``model`` may also be a transformers model in memory: a reduced one (``compress(...).model``, a model reduced
    by ``reduce_``), compared with ``reference`` (its original, in memory or a folder; default: the source its
    compression block records), or an original with ``key_dim``, reduced in a copy. A model in memory is timed as
    it is, where its weights are (or moved to an explicit ``device``), with its own attention implementation."""
    import torch

    from . import bench
    from .reduction import cost
    from .reduction.modeling import max_tokens

    named_models = {"model": model, "reference": reference}
    in_memory = _in_memory(named_models)
    notify = checked_call(on_progress, {"latency": latency, "first_token_only": first_token_only,
                                        "allow_pickle": allow_pickle}, in_memory="a transformers model",
                          **{k: v for k, v in named_models.items() if k not in in_memory})
    from .reduction import methods
    from .reduction.config import _int

    seq_len, batch_size, repeats = (_int(option, value, 1) for option, value in  # --seq-len etc. are IntRange(1)
                                    (("seq_len", seq_len), ("batch_size", batch_size), ("repeats", repeats)))
    if attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"attn_implementation must be one of sdpa, eager; got {attn_implementation!r}")
    if method is not None and method not in methods.names():  # a choice: refused for a reduced folder too
        raise ConfigError(f"method must be one of {', '.join(methods.names())}; got {method!r}")
    from .devices import is_auto, resolve_device

    moved = not is_auto(device)  # a model in memory stays where it is unless a device is named
    device = str(resolve_device(device))  # 'auto' too; a device this machine lacks fails before any model loads
    if "model" in in_memory:
        attn_implementation = _own_attention(model, attn_implementation)
        device = device if moved else str(next(model.parameters()).device)
    name = in_memory.get("model") or str(model)
    if "model" not in in_memory:
        notify(Progress(f"loading {name}"))
    original, reduced, info = load_pair(model if "model" in in_memory else name, key_dim=key_dim, method=method,
                                        attn_implementation=attn_implementation, allow_pickle=allow_pickle,
                                        reference=reference, name=name)
    from .reduction.surgery import check_finite_weights

    for checked, who in ((reduced, name), (original, info["original"])):  # timed, a NaN model looks as fast as any
        check_finite_weights(checked, who)
    if first_token_only:
        if reduced is model:  # switching on the shortcut would change the caller's model
            raise ConfigError("first_token_only=True switches on the shortcut in a model report reduces or loads; "
                              "a reduced model in memory is timed as it is (reduce it with "
                              "ReductionConfig(first_token_only=True))")
        first_token_shortcut(reduced, name)
    limit = max_tokens(original)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"{given('--seq-len', seq_len)} is more than {name} can take ({limit} positions); pass "
                          f"{given('--seq-len', limit)} or less")
    original, reduced = original.to(device), reduced.to(device)
    result = {"model": name, **info, "attn_implementation": reduced.config._attn_implementation,  # eager for MPNet
              "threads": torch.get_num_threads(),
              "first_token_only": first_token_only,
              **cost.compare(cost.layer_shapes(original), cost.layer_shapes(reduced), seq_len, batch_size)}
    if latency:
        if batch_size * seq_len >= 2**63:  # torch cannot describe such a batch: a TypeError from randint
            raise UsageError(f"out of memory (a batch of {batch_size} x {seq_len} tokens cannot be allocated); pass "
                             f"a smaller {named('--batch-size')}")
        notify(Progress(f"timing batch {batch_size} x {seq_len} tokens, {repeats} runs per side"))
        batch = {k: v.to(device) for k, v in bench.inputs(original.config.vocab_size, batch_size, seq_len).items()}
        # process CPU time steadies the ratio on a shared CPU; on an accelerator it is the host waiting: not given
        cpu_model, cpu_layer = ({}, {}) if torch.device(device).type == "cpu" else (None, None)
        model_s = bench.model_latency(original, reduced, batch, repeats=repeats, cpu=cpu_model, device=device)
        layer_s = bench.attention_latency(original, reduced, batch_size, seq_len, repeats=repeats, cpu=cpu_layer,
                                          device=device)
        result["latency"] = {"model": bench.with_ratio(model_s, cpu_model),
                             "attention_layer": bench.with_ratio(layer_s, cpu_layer), "repeats": repeats}
    return result


@memory_refused()
def to_onnx(directory: str | os.PathLike, output: str | os.PathLike, *, fmt: str = "onnx", force: bool = False,
            opset: int = 18, tolerance: float = 1e-4, first_token_only: bool = False,
            on_progress: OnProgress = None) -> dict:
    """Export the reduced model in ``directory`` to ``output``, run in onnxruntime on padded batches and compared
    with PyTorch before the file is written (a file that fails the check is never written). `mhacompress export`
    in one call: returns what ``export --json`` prints, less the envelope.

    ``directory`` may also be a reduced model in memory (``compress(...).model``, or the ``Compressed`` itself),
    exported as it is, on the CPU, without saving it first; it is left as it was (its training mode included)."""
    from .export import FORMATS, check_settings, export_onnx
    from .hub import check_output, load
    from .pipeline import Compressed
    from .reduction.surgery import check_finite_weights

    directory = directory.model if isinstance(directory, Compressed) else directory
    in_memory = _is_model(directory)
    notify = checked_call(on_progress, {"first_token_only": first_token_only},
                          in_memory="a reduced model in memory (compress(...).model)",
                          **({} if in_memory else {"directory": directory}))
    if (fmt.lower() if isinstance(fmt, str) else fmt) not in FORMATS:  # --format ONNX is onnx
        raise ConfigError(f"unsupported {named('--format', 'fmt')} {fmt!r}; supported: {', '.join(FORMATS)}")
    opset, tolerance = check_settings(opset=opset, tol=tolerance)
    name = _in_memory_name(directory) if in_memory else str(directory)
    source = _exportable(directory, first_token_only) if in_memory else recorded_source(directory)
    target = check_output(output, force, kind="file", sources=[None if in_memory else directory, source])  # first
    try:
        if in_memory:
            model = directory
        else:
            notify(Progress(f"loading {directory}"))
            model, _ = load(directory, attn_implementation="sdpa", tokenizer=False)
        check_finite_weights(model, name)  # else onnxruntime "differs from PyTorch by nan"
        if first_token_only:
            first_token_shortcut(model, directory)
        notify(Progress(f"exporting to {output} and checking it in onnxruntime"))
        training = model.training
        try:
            result = export_onnx(model, output, opset=opset, tol=tolerance, force=force)
        finally:
            model.train(training)  # export_onnx runs it in eval mode; a caller's model is given back as it came
    finally:  # a refusal leaves no lock or parent folder behind (the CLI's process ends; a Python session goes on)
        fsio.release(target)
    return {"model": name, "first_token_only": first_token_only, **result}


def _exportable(model, first_token_only: bool) -> str | None:
    """A model in memory that ``to_onnx`` can export as it is: reduced, on the CPU, and not to be changed by the
    [CLS] shortcut. Returns the original its block records (an output must not overwrite it)."""
    from .reduction.modeling import COMPRESSION_KEY

    block = getattr(model.config, COMPRESSION_KEY, None)
    if not block:
        raise UsageError(f"{_in_memory_name(model)} is not a reduced model: reduce it first "
                         f"(mhacompress.compress(model, ReductionConfig(key_dim=...)).model) and export that")
    device = next(model.parameters()).device
    if device.type != "cpu":  # exported and checked on the CPU: moving it would move the caller's model
        raise UsageError(f"{_in_memory_name(model)} is on {device}; ONNX export runs on the CPU: pass model.cpu(), "
                         f"or save it and export the folder")
    if first_token_only:  # switching on the shortcut would change the caller's model
        raise ConfigError("first_token_only=True switches on the shortcut in a model to_onnx loads; a model in memory "
                          "is exported as it is (reduce it with ReductionConfig(first_token_only=True))")
    source = block.get("source_model")
    return source if isinstance(source, str) else None


def _outputs_finite(model, tokenizer, texts, max_length: int) -> bool:
    """Whether ``model``'s logits on ``texts`` are all finite (eval mode, as it will be scored)."""
    from .errors import UsageError
    from .eval.runner import forward_all

    model.eval()
    try:
        forward_all(model, tokenizer, texts, fn=lambda m, enc: m(**enc).logits, max_length=max_length,
                    device=str(next(model.parameters()).device))
    except UsageError:  # check_finite_outputs: the only refusal left once the model has trained on these texts
        return False
    return True


@memory_refused("--batch-size", "--limit")
def finetune(model: str | os.PathLike, task: str, output: str | os.PathLike, *, force: bool = False,
             epochs: float = 3, lr: float = 2e-5, batch_size: int = 32, max_length: int = 128, warmup: float = 0.1,
             weight_decay: float = 0.01, seed: int = 0, limit: int | None = None, data_dir: str | None = None,
             device: str = "auto", evaluate: bool = True, allow_pickle: bool = False,
             on_progress: OnProgress = None) -> dict:
    """Fine-tune ``model`` (a folder, hub id or alias) on ``task``'s train split and save it to ``output``
    (atomically; ``force`` replaces a model folder there). A plain encoder gets a fresh sequence-classification head;
    a reduced model keeps its collaborative layers. ``evaluate``: score the result on the dev split (``eval``: its
    metrics, or why they were skipped; ``evaluate=False`` is ``--no-eval``). ``limit``: train on a seeded random
    sample of that many examples. `mhacompress finetune` in one call: returns what ``finetune --json`` prints, less
    the envelope."""
    import time

    from .devices import resolve_device
    from .eval.data import glue_folder, load_examples
    from .eval.finetune import train, with_head
    from .eval.tasks import get_task
    from .hub import check_output, load_pretrained, save
    from .reduction.surgery import check_finite_weights, nonfinite_weight

    notify = checked_call(on_progress, {"evaluate": evaluate, "allow_pickle": allow_pickle}, model=model)
    epochs, lr, batch_size, max_length, warmup, weight_decay, seed, limit = check_training(
        epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, warmup=warmup,
        weight_decay=weight_decay, seed=seed, limit=limit).values()
    device = str(resolve_device(device))  # 'auto' too; a device this machine lacks fails before any work
    spec, name = get_task(task), str(model)
    target = check_output(output, force, sources=[model, glue_folder(data_dir), recorded_source(model)])
    try:  # a refusal leaves no lock or parent folder behind (the CLI's process ends; a Python session goes on)
        data = load_examples(spec, "train", data_dir=data_dir, limit=limit, seed=seed)
        if data.labels is None:
            raise UsageError(f"{data.source} has no labels to train on; fine-tune on a train split with labels")
        scorer, skipped = dev_scorer(spec, data_dir, max_length, device) if evaluate else (None, None)
        start = time.perf_counter()
        notify(Progress(f"loading {name}"))
        loaded, tokenizer, _ = load_pretrained(name, allow_pickle=allow_pickle, device=device)
        check_finite_weights(loaded)  # training a damaged checkpoint writes a NaN model
        loaded = with_head(loaded, spec, seed=seed, name=name)
        # a half-precision checkpoint trains in float32 and is saved in its own dtype: AdamW on float16 weights
        # divides by squared gradients that underflow to 0, and every run 'diverged' whatever --lr
        dtype = next(loaded.parameters()).dtype
        loaded = loaded.float()
        steps, done = max(1, round(epochs * -(-len(data) // batch_size))), [0]
        notify(Progress(f"{spec.name}: {len(data):,} examples", 0, steps))

        def step(loss: float) -> None:
            done[0] += 1
            notify(Progress(f"{spec.name}: loss {loss:.3f}", done[0], steps))

        try:
            log = train(loaded, tokenizer, data, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                        warmup=warmup, weight_decay=weight_decay, seed=seed, device=device, on_step=step)
        except RuntimeError as err:  # a rate past float32's range: the optimizer cannot even apply a step
            if "without overflow" not in str(err):
                raise
            raise UsageError(f"training diverged: a step at {named('--lr')} {lr:g} overflows the weights' float32 "
                             f"range, so nothing was written; try a lower {named('--lr')}") from None
        loaded = loaded.to(dtype)
        # checked before anything is written: a NaN model is no result, nor one whose weights are finite but so large
        # that its outputs overflow (one step at a huge --lr, or past float16's range once cast back)
        diverged = nonfinite_weight(loaded)
        what = f"the weight {diverged} holds" if diverged else (
            None if _outputs_finite(loaded, tokenizer, data.texts[:32], max_length)
            else "the model's outputs on its train examples hold")
        if what:
            raise UsageError(f"training diverged: after {log['steps']} steps {what} NaN or infinite values, so "
                             f"nothing was written; try a lower {named('--lr')} (got {lr:g}) or fewer "
                             f"{named('--epochs')}, or check the starting checkpoint (weights too large to train on)")
        notify(Progress(f"saving to {output}"))
        save(loaded, tokenizer, output, force=force, source=name)
    finally:
        fsio.release(target)
    result = {"model": name, "task": spec.name, "output": str(output), "examples": len(data), "steps": log["steps"],
              "loss": {"first": _mean(log["losses"][:10]), "last": _mean(log["losses"][-10:])}}
    if scorer is not None:
        notify(Progress(f"scoring on {spec.name} [validation]"))
        result["eval"] = {"split": "validation", "examples": len(scorer.examples),
                          "metrics": scorer(loaded, tokenizer, str(output))}  # the saved model, not its source
    elif skipped:
        result["eval"] = {"skipped": skipped}
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


@memory_refused("--seq-len")
def analyze(model: str | os.PathLike, *, seq_len: int = 128, key_dims: list[int] | None = None, curve: bool = True,
            plot: str | os.PathLike | None = None, force: bool = False, allow_pickle: bool = False,
            on_progress: OnProgress = None) -> dict:
    """Spectra, effective ranks and (``curve``) error-vs-key-dim curves of every self-attention layer of an original
    ``model``, with the layers whose heads are narrower than ``seq_len`` flagged (the low-rank bottleneck).
    ``key_dims``: where the curves are evaluated (default about 8 up to H*dh). ``plot``: a folder (created) to
    write the figures into (``figures``: their paths); files there with the figures' names are replaced (and an
    earlier run's cp_error.png removed when ``curve`` is False) only with ``force``. `mhacompress analyze` in one
    call (``curve=False`` is ``--no-curve``): returns what ``analyze --json`` prints, less the envelope."""
    import time

    from .eval.data import glue_folder_if_usable
    from .figures import ANALYSIS_FIGURES, analysis_figures, figure_format
    from .hub import check_output, load_pretrained
    from .reduction.allocate import candidate_dims
    from .reduction.analysis import analyze_model
    from .reduction.config import _int
    from .reduction.surgery import model_shape

    notify = checked_call(on_progress, {"curve": curve, "force": force, "allow_pickle": allow_pickle}, model=model)
    seq_len = _int("seq_len", seq_len, 1)
    key_dims = check_key_dims(key_dims, curve)
    target = None
    if force and plot is None:
        raise ConfigError(f"{named('--force', 'force=True')} replaces the figures in a {named('--plot DIR', 'plot')} "
                          f"folder; give {named('--plot DIR', 'plot=DIR')} or drop {named('--force', 'force=True')}")
    if plot is not None:  # refused before the work: no matplotlib, the source, a file, an unwritable place
        figure_format(Path(str(plot)) / ANALYSIS_FIGURES[0])
        # $MHACOMPRESS_GLUE_DIR: analyze reads no GLUE data, but writes into it no more than any command does
        target = check_output(plot, sources=[model, glue_folder_if_usable()], kind="contents", option="--plot")
        there = [name for name in ANALYSIS_FIGURES if os.path.lexists(target / name)]
        if there and not force:  # the user's own files, maybe: replaced (or removed) only when asked
            raise UsageError(f"{named('--plot')} {plot} already holds {', '.join(there)}; pass "
                             f"{named('--force', 'force=True')} to replace the figures there, or choose another "
                             f"{named('--plot')} folder")
    try:
        start, name = time.perf_counter(), str(model)
        notify(Progress(f"loading {name}"))
        loaded, _, source = load_pretrained(name, allow_pickle=allow_pickle, tokenizer=False)
        layers, heads, head_dim = model_shape(loaded)
        steps, done = layers * (1 + (len(set(key_dims or candidate_dims(heads, head_dim, "cp"))) if curve else 0)), [0]

        def step() -> None:
            done[0] += 1
            notify(Progress("analyzing", done[0], steps))

        report = analyze_model(loaded, key_dims=key_dims, seq_len=seq_len, curve=curve, on_step=step)
        result = {"model": name, "source": source.location, **report,
                  "seconds": round(time.perf_counter() - start, 3)}
        if plot is not None:
            notify(Progress(f"writing figures into {plot}"))
            result["figures"] = [str(p) for p in analysis_figures(result, Path(plot).expanduser())]
    finally:
        if target is not None:
            fsio.release(target)
    return result


# ---- shared steps ----------------------------------------------------------------------------------------------


def check_in_memory(models: dict, tokenizer, first_token_only) -> dict[str, str]:
    """The models given as transformers models in memory, each with the name it is reported by; refused in one line:
    one without ``tokenizer``, a ``tokenizer`` beside folders only (each reads its own), and ``first_token_only``
    (it would switch the caller's model: a reduction installs the shortcut, ``ReductionConfig(first_token_only=
    True)``)."""
    in_memory = _in_memory(models)
    if in_memory and (tokenizer is None or isinstance(tokenizer, type) or not callable(tokenizer)):
        option = next(iter(in_memory))
        raise UsageError(f"{option} is a model in memory: pass its tokenizer too (tokenizer=..., e.g. "
                         f"AutoTokenizer.from_pretrained(...) of its checkpoint); got {type(tokenizer).__name__}")
    if tokenizer is not None and not in_memory:
        raise ConfigError("tokenizer is for a model in memory; a model folder, hub id or alias reads its own: drop "
                          "tokenizer")
    if in_memory and first_token_only is True:
        raise ConfigError("first_token_only=True switches on the shortcut in a model evaluate loads; a model in "
                          "memory is scored as it is (reduce it with ReductionConfig(first_token_only=True))")
    return in_memory


def _in_memory(models: dict) -> dict[str, str]:
    """Of ``models`` (option: value), those given as transformers models in memory, each with its reported name."""
    return {option: _in_memory_name(value) for option, value in models.items() if _is_model(value)}


def _in_memory_name(model) -> str:
    """How a model in memory is named in results: the folder it was read from, else its class."""
    return f"{getattr(model.config, '_name_or_path', '') or type(model).__name__} (in memory)"


def checked_call(on_progress: OnProgress, flags: dict | None = None, in_memory: str = "",
                 **models) -> Callable[[Progress], None]:
    """The progress callback to use, after refusing arguments of the wrong kind in one line (not a TypeError from
    deep inside): a model that is not a path or name (None counts only where it is optional; ``in_memory``: the
    transformers models the call takes too, in words), a flag that is not a bool ('no' is a true value), a callback
    that cannot be called."""
    from .reduction.config import _flag

    for option, value in (flags or {}).items():
        _flag(option, value)
    for option, value in models.items():
        if value is None and option == "reference":
            continue
        if not isinstance(value, (str, os.PathLike)):
            what = "the folder of a reduced model" if option == "directory" else "a model folder, hub id or alias"
            also = f", or {in_memory}" if in_memory else ""
            raise UsageError(f"{option} must be {what} (a str or Path){also}; got {type(value).__name__}")
    return notifier(on_progress)



def load_pair(model, *, key_dim=None, method=None, attn_implementation="sdpa", allow_pickle: bool = False,
              reference=None, name: str | None = None):
    """(original, reduced, description): a reduced model (a folder, or in memory) and its original (``reference``,
    a folder or in memory, else the source its block records), or an original (a folder, or in memory) reduced in
    a copy by ``method`` (default cp); pickled weights (an original's) only with ``allow_pickle``."""
    import copy

    from .hub import load_pretrained
    from .pipeline import compress
    from .reduction.config import ReductionConfig
    from .reduction.modeling import COMPRESSION_KEY, base_model_type, is_classifier
    from .reduction.surgery import model_shape

    name, in_memory = name or str(model), _is_model(model)
    if not in_memory:
        model, _, _ = load_pretrained(name, attn_implementation=attn_implementation, tokenizer=False,
                                      allow_pickle=allow_pickle)
    block = getattr(model.config, COMPRESSION_KEY, None)
    if not block and reference is not None:
        raise ConfigError(f"reference is the original of a reduced model; {name} is an original, compared with "
                          f"itself reduced to key_dim: drop reference")
    if block:
        if key_dim is not None:
            raise ConfigError(f"{name} is already reduced (key dim {block.get('key_dim')}); drop "
                              f"{named('--key-dim')}")
        if method is not None and method != block.get("method"):  # it was reported as the folder's, unsaid
            raise ConfigError(f"{name} is already reduced, by {block.get('method')}; drop {named('--method')}")
        source = block.get("source_model") or "" if reference is None else \
            _in_memory_name(reference) if _is_model(reference) else str(reference)
        if not source and in_memory:  # reduce_ records none: the caller has it
            raise UsageError(f"{name} records no original to compare with; pass it as reference (the original "
                             f"model in memory, or its folder)")
        try:
            original = reference if _is_model(reference) else load_pretrained(
                source, attn_implementation=attn_implementation, tokenizer=False, allow_pickle=allow_pickle)[0]
        except UsageError as err:  # its own fix ("pass a folder ...") is not one report can take
            if reference is not None:
                raise
            raise UsageError(f"cannot load the original {source!r} recorded in {name} ({str(err).split('; ')[0]}); "
                             f"put the original back there, or report the original with "
                             f"{named('--key-dim')}") from None
        what, fix = (f"the original {source!r} recorded in {name}", f"restore the original checkpoint there, or "
                     f"report an original with {named('--key-dim')}") if reference is None else \
            (f"reference {source}", f"pass the original {name} was reduced from as reference")
        if getattr(original.config, COMPRESSION_KEY, None):  # replaced since: the counts would compare two reductions
            raise UsageError(f"{what} is itself a reduced model; {fix}")
        shapes = [model_shape(m) for m in (original, model)]  # (layers, heads, head dim): another model since
        types = [base_model_type(m.config) for m in (original, model)]
        heads = [("a classifier" if is_classifier(m) else "an encoder") for m in (original, model)]
        if shapes[0] != shapes[1] or types[0] != types[1] or heads[0] != heads[1]:  # (eval --reference refuses
            # a classifier against an encoder too: the whole model's counts and latency would compare two things)
            original_shape, reduced_shape = (f"{head} {kind}, {shape[0]} layers x {shape[1]} heads of {shape[2]}"
                                             for head, kind, shape in zip(heads, types, shapes))
            raise UsageError(f"{what} is not the model it was reduced from ({original_shape}; the reduced model: "
                             f"{reduced_shape}); {fix}")
        if _is_model(reference) and _attention_of(reference) != attn_implementation:
            raise ConfigError(f"reference runs with {_attention_of(reference)!r} attention and {name} with "
                              f"{attn_implementation!r}: the timings would compare kernels, not the reduction; set "
                              f"one implementation on both (model.set_attn_implementation)")
        return original, model, {"method": block["method"], "key_dim": block.get("key_dim"), "original": source}
    if key_dim is None:
        raise ConfigError(f"{name} is an original model: pass {named('--key-dim')} to reduce it in memory, or give a "
                          f"folder written by `mhacompress reduce`")
    method = method or "cp"
    config = ReductionConfig(key_dim=key_dim, method=method)  # weights only: latency does not depend on the data
    reduced = compress(copy.deepcopy(model), config).model
    return model, reduced, {"method": method, "key_dim": key_dim, "original": name}


def _is_model(value) -> bool:
    """Whether ``value`` is a transformers model in memory (not a folder, hub id or alias)."""
    return hasattr(getattr(value, "config", None), "model_type")


def _attention_of(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _own_attention(model, asked: str) -> str:
    """The attention implementation of a model in memory, which report times as it is: ``asked`` (the option's
    value) may only name it, or be the default."""
    own = _attention_of(model)
    if asked not in ("sdpa", own):
        raise ConfigError(f"attn_implementation={asked!r}: a model in memory runs with its own attention "
                          f"implementation ({own!r}); drop attn_implementation, or set it on the model "
                          f"(model.set_attn_implementation({asked!r}))")
    return own


def recorded_source(directory) -> str | None:
    """The original model a reduced folder was made from, as its compression block records it (None if unreadable):
    a command that writes must not overwrite it either."""
    from .hub import read_config
    from .reduction.modeling import COMPRESSION_KEY

    try:
        block = read_config(Path(directory).expanduser()).get(COMPRESSION_KEY)
    except (UsageError, OSError):  # loading the folder reports it in one line, right after
        return None
    return block.get("source_model") if isinstance(block, dict) else None


def first_token_shortcut(model, name) -> None:
    """Switch on the exact [CLS] shortcut, or fail with one line saying why it does not apply to ``name``."""
    from .reduction.modeling import first_token_only_
    from .reduction.surgery import require_classifier

    require_classifier(model, name)
    try:
        first_token_only_(model)
    except ValueError as err:
        raise ConfigError(f"{named('--first-token-only')}: {err} (reduce {name} first, or drop "
                          f"{named('the flag', 'it')})") from None


EPOCHS_MAX = 1e6  # far past any useful run, and epochs x batches stays a step count (1e308 epochs overflowed)


def check_training(**settings) -> dict:
    """finetune's settings, refused in one line as its command's options are: --epochs in 0..EPOCHS_MAX (0
    excluded); --lr > 0; --warmup in 0..1; --weight-decay >= 0 (all finite); --batch-size, --limit >= 1;
    --max-length >= 8; --seed 0..2**32-1; --weight-decay x --lr < 1. Returns them, in the order given, as Python
    numbers (a numpy scalar as the int or float it holds)."""
    from .reduction.config import SEED_MAX, _int, _number

    checks = {"epochs": lambda v: _number("epochs", v, 0, EPOCHS_MAX, above=True),
              "lr": lambda v: _number("lr", v, 0, above=True),
              "warmup": lambda v: _number("warmup", v, 0, 1),
              "weight_decay": lambda v: _number("weight_decay", v, 0),
              "batch_size": lambda v: _int("batch_size", v, 1),
              "max_length": lambda v: _int("max_length", v, 8),
              "seed": lambda v: _int("seed", v, 0, SEED_MAX),
              "limit": lambda v: None if v is None else _int("limit", v, 1)}
    out = {name: checks[name](value) for name, value in settings.items()}
    if out["lr"] * out["weight_decay"] >= 1:  # AdamW's decoupled decay: w <- w (1 - lr wd) every step
        raise ConfigError(f"{named('--weight-decay')} times {named('--lr')} must be below 1 (AdamW shrinks every "
                          f"weight by that share a step); got {out['weight_decay']:g} x {out['lr']:g}")
    return out


def dev_scorer(task, data_dir, max_length: int, device: str):
    """(the dev split's scorer, None), or (None, why it cannot be read): loaded before training, so that a missing
    file shows at once, not after the run."""
    from .eval.compare import Scorer

    try:
        return Scorer.for_task(task.name, data_dir=data_dir, max_length=max_length, device=device), None
    except UsageError as err:
        return None, str(err)


def check_key_dims(key_dims, curve: bool) -> list[int] | None:
    """analyze's key dims: None, or a non-empty sequence of integers (their range is the model's to check), and only
    with the curve they are for; returned as a list of Python ints."""
    from .reduction.config import _flag

    _flag("curve", curve)
    if key_dims is None:
        return
    from .reduction.config import _plain, ordered

    dims = [_plain(k) for k in key_dims] if ordered(key_dims) else []  # a numpy array or integers: as Python ints
    if not dims or not all(isinstance(k, int) and not isinstance(k, bool) for k in dims):
        raise ConfigError(f"key_dims must be a list of integers, e.g. [48, 96, 192]; got {key_dims!r:.40}")
    if not curve:
        raise ConfigError(f"{named('--key-dims')} sets the key dims of the error curve, which "
                          f"{named('--no-curve', 'curve=False')} skips; drop one")
    return dims


def _mean(xs):
    return sum(xs) / len(xs)
