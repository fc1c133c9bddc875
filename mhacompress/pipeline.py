"""The library's one call: ``mhacompress.compress(model_or_name, config)`` loads, calibrates, allocates, reduces,
refines and installs the [CLS] shortcut, in that order, and returns a ``Compressed`` (model, tokenizer, report).

The CLI's ``reduce``, ``sweep`` and ``report`` are thin faces over this. Progress is reported through a callback;
nothing here prints, and nothing here imports mhacompress.cli.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .errors import UsageError, given, memory_refused, named
from .reduction.config import Calibration, ConfigError, ReductionConfig, ordered

Texts = Sequence["str | tuple[str, ...]"]


@dataclass(frozen=True)
class Progress:
    """One progress event: ``stage`` (e.g. "loading", "calibrating", "layer 3: reduced"), ``done`` of ``total``
    (total 0: a step without a count)."""

    stage: str
    done: int = 0
    total: int = 0


@dataclass
class Compressed:
    """What ``compress`` returns: the reduced model, its tokenizer, and the report (the JSON of ``reduce --json``)."""

    model: object
    tokenizer: object
    report: dict
    config: ReductionConfig
    source: str | None = None  # the folder the original was read from (files to carry over when saving)
    inputs: tuple = ()  # what else the reduction read (the GLUE folder, a calibration file): never saved over
    _saved: list = field(default_factory=list, repr=False)

    def save(self, directory, force: bool = False) -> Path:
        """Write an ordinary HF folder (atomically): weights, config with the compression block, modelling code,
        tokenizer and every file of the source that the reduction does not change."""
        return self._save(directory, force, "directory")

    def _save(self, directory, force: bool, argument: str) -> Path:
        """``save``, naming ``directory`` as the caller's ``argument`` in messages; the report records the folder
        (``output``, as `reduce --json` does)."""
        from .hub import save_as

        path = save_as(self.model, self.tokenizer, directory, force=force, source=self.source, inputs=self.inputs,
                       argument=argument)
        self._saved.append(str(path))
        self.report["output"] = str(directory)  # as given, as `reduce --json` prints it
        return path


@memory_refused("--samples")  # an allocation that fails: the line `reduce` prints
def compress(model_or_name, config: ReductionConfig, *, tokenizer=None, calibration: Texts | None = None,
             on_progress: Callable[[Progress], None] | None = None, device: str | None = None,
             allow_pickle: bool = False, data_dir: str | None = None, evaluate: str | None = None,
             eval_batch_size: int = 64, max_drop: float | None = None, output: str | Path | None = None,
             force: bool = False, weights_only: bool = False, pooling: str | None = None) -> Compressed:
    """Reduce a model's self-attention as ``config`` says; everything ``mhacompress reduce`` does, in one call.

    model_or_name: a transformers model (reduced IN PLACE; pass a copy to keep the original) with ``tokenizer``, or
      a local folder / hub id / alias (``minilm`` is bundled), loaded here. A model loaded from a sentence-transformers
      folder is calibrated at the tokens that folder's pooling reads, either way.
    calibration: the calibration sequences themselves (strings, or tuples for sentence pairs; blank ones skipped, as
      the file readers skip blank lines and empty fields); by default they are read from
      ``config.calibration.source`` (a GLUE task's train split in ``data_dir``, or a .txt / .jsonl file).
    evaluate: a GLUE task whose dev split scores the original and the reduced model (report["eval"]). A config
      without calibration is then calibrated on the task's train sentences (unlabelled; ``Calibration(TASK,
      seed=config.seed)``), as ``reduce --eval TASK`` is, or refused when they cannot be read.
    weights_only: reduce from the weights alone even with ``evaluate`` (``reduce --weights-only``).
    max_drop: with ``evaluate``, the gate of ``reduce --max-drop``: report["eval"]["passed"] is False when the reduced
      model loses more than this on the task's main metric (absolute, e.g. 0.01; an undefined, nan, drop never
      passes). Nothing is raised: the reduced model is returned either way, to inspect, save or discard.
    output: a folder to write the reduced model to (``reduce --output``), checked before any work (never the source
      or the data read; an existing non-empty folder only with ``force=True``, which replaces a model folder) and
      written atomically at the end; report["output"] names it (None: nothing written, a dry run).
    pooling: how a sentence encoder's embedding is read, "mean", "cls" or "max": calibrated at the tokens it reads
      (a CLS-pooled encoder at its first token). By default what the model's sentence-transformers folder says
      (modules.json), else the mean; give it for a model object built in memory or loaded without that folder.
    on_progress: called with ``Progress`` events.
    """
    _check_arguments(model_or_name, config, tokenizer)
    _check_pooling(pooling)
    from .reduction.config import _flag, _int

    # by its own name (the scorer's is batch_size); both checked even when unused, as the command line's options
    # are: a typo there is not silently ignored
    eval_batch_size = _int("eval_batch_size", eval_batch_size, 1)
    _flag("force", force)
    if force and output is None:  # nothing to replace: a dry run (or a save later, which takes its own force)
        raise ConfigError(f"{named('--force', 'force=True')} replaces an existing {named('--output')} folder; give "
                          f"{named('--output DIR', 'output=DIR')} or drop {named('--force', 'force=True')}")
    max_drop = check_gate(max_drop, evaluate)
    config = eval_calibration(config, evaluate, weights_only, data_dir, calibration)
    target = None
    if output is not None:  # refused before any work, as `reduce --output` is, and held until written
        from .hub import check_output

        models = [model_or_name if isinstance(model_or_name, (str, Path)) else model_or_name.config._name_or_path,
                  getattr(tokenizer, "name_or_path", None)]
        target = check_output(output, force, sources=[*models, *data_sources(config, data_dir, evaluate, calibration)],
                              argument="output")
    try:
        import torch

        with torch.inference_mode(False):  # a call inside inference_mode: the refinement needs autograd
            result = _compress(model_or_name, config, tokenizer=tokenizer, calibration=calibration,
                               on_progress=on_progress, device=device, allow_pickle=allow_pickle, data_dir=data_dir,
                               evaluate=evaluate, eval_batch_size=eval_batch_size, max_drop=max_drop,
                               pooling=pooling)
        if output is not None:
            result._save(output, force, "output")
        return result
    finally:  # a refusal leaves no lock or parent folder behind (the CLI's process ends; a Python session goes on)
        if target is not None:
            from . import fsio

            fsio.release(target)


def _compress(model_or_name, config: ReductionConfig, *, tokenizer, calibration, on_progress, device, allow_pickle,
              data_dir, evaluate, eval_batch_size, max_drop, pooling=None) -> Compressed:
    """``compress`` without its output: load, calibrate, allocate, reduce, refine, evaluate."""
    start = time.perf_counter()
    notify = notifier(on_progress)
    if device is not None:
        from .devices import resolve_device

        device = str(resolve_device(device))
    texts = _calibration_texts(config, calibration, data_dir)
    scorer = _scorer(evaluate, data_dir, eval_batch_size, device)
    training = not isinstance(model_or_name, (str, Path)) and bool(getattr(model_or_name, "training", False))
    model, tokenizer, source, name = _load(model_or_name, tokenizer, allow_pickle, device, notify)  # in eval mode
    if pooling is not None:
        _set_pooling(model, pooling)
    if scorer is not None:
        scorer.device = str(next(model.parameters()).device)
    if tokenizer is None and (texts is not None or scorer is not None):
        raise ConfigError("calibration and evaluation tokenize text: pass the model's tokenizer, "
                          "compress(model, config, tokenizer=tokenizer)")
    from .reduction.modeling import is_classifier
    from .reduction.surgery import check_reducible, hooked_attention, model_shape, require_classifier

    check_reducible(model, in_place=config.calibration is not None)  # the compensation refits output projections
    if config.first_token_only:
        require_classifier(model, name)
    warnings = [hooks] if (hooks := hooked_attention(model)) else []
    if config.calibration is None and is_classifier(model):
        warnings.append(f"{WEIGHTS_ONLY_CLASSIFIER} (compress: config.calibration)")
    head = getattr(model, "sentence_head", None)
    if config.calibration is not None and head is not None and head.unsupported:
        warnings.append(f"{name}'s sentence embedding cannot be reproduced: mhacompress does not read "
                        f"{head.unsupported}; the calibration fitted the transformer's token states, not the embedding "
                        f"its users get: check the reduced model with sentence-transformers")
    if getattr(model, "initialised", None):  # transformers' own warning, which loading keeps off stderr
        warnings.append(f"{name} has no pooler weights ({model.initialised[0]}): its pooler, saved with the reduced "
                        f"model, was initialised from a fixed seed as transformers does, so pooler_output (and a head "
                        f"that reads it) means nothing; read last_hidden_state instead")
    params_before = sum(p.numel() for p in model.parameters())
    original_scores = scorer(model, tokenizer, "the original") if scorer else None
    original_outputs = scorer.last if scorer else None
    batches = _batches(model, tokenizer, texts, config.calibration) if texts is not None else None
    sequences = None if batches is None else sum(len(b["attention_mask"]) for b in batches)
    # texts handed in are what the caller chose to give, whatever samples says (by default 512) and whichever source
    # the config names as theirs (a sample drawn from it by hand): no warning there
    if sequences is not None and sequences < config.calibration.samples and calibration is None:
        warnings.append(f"calibrated on {sequences} sequences, fewer than the {config.calibration.samples} asked for "
                        f"({config.calibration.source} has no more); the fit may not carry to other text: calibrate "
                        f"on a larger source")
    curves = None
    shape = model_shape(model)  # (layers, heads, head dim)
    width = shape[1] * shape[2]
    config = _used_length(config.decided(width, shape[0], _read_at_first_token(model)), model)  # as decided for it
    if config.budget is not None or config.allocate:
        dims, curves = _allocate(model, config, batches, notify)
    else:
        dims = config.layer_key_dims(*shape)
    layers, modified = _reduce(model, config, dims, batches, notify)
    _check_finite(model, config.calibration is not None)
    from . import __version__
    from .reduction.surgery import finish_

    # a local original by its absolute path: `report` reloads it from wherever it runs
    recorded = str(Path(source).expanduser().absolute()) if source and Path(source).expanduser().is_dir() else None
    block = finish_(model, config, layers, source=recorded or source or name, tool_version=__version__,
                    modified=modified)
    evaluated = None
    if scorer:
        from .eval.compare import gated, side_by_side

        reduced_scores = scorer(model, tokenizer, "the reduced model")
        evaluated = side_by_side(scorer.task, original_scores, reduced_scores,
                                 scorer.drop_intervals(original_outputs, scorer.last))
        if max_drop is not None:
            evaluated = gated(evaluated, max_drop)
    report = _report(name, source, config, block, params_before, model, curves, evaluated, warnings,
                     time.perf_counter() - start, sequences)
    inputs = data_sources(config, data_dir, evaluate, calibration)
    model.train(training)  # a model handed over in training mode is given back in it (calibrated with dropout off)
    return Compressed(model, tokenizer, report, config, source=source, inputs=inputs)


WEIGHTS_ONLY_CLASSIFIER = ("reducing a fine-tuned classifier from the weights alone loses accuracy; calibrate on its "
                           "task's unlabelled train sentences: --calibrate TASK")


def data_sources(config: ReductionConfig, data_dir=None, evaluate: str | None = None, texts=None) -> tuple:
    """What a reduction reads besides the model: the GLUE folder (``data_dir``, else $MHACOMPRESS_GLUE_DIR) when it
    evaluates or calibrates from a source, and that source (``texts``: the calibration texts were handed over
    instead). No output may be, contain or lie inside them: `reduce` checks before any work, ``Compressed.save`` at
    saving."""
    from .eval.data import glue_folder

    c = config.calibration
    from_source = c is not None and texts is None
    glue = glue_folder(data_dir) if evaluate is not None or from_source else data_dir
    return tuple(p for p in (glue, c.source if from_source else None) if p is not None)


# ---- steps ------------------------------------------------------------------------------------------------


def _check_arguments(model_or_name, config, tokenizer) -> None:
    """Arguments of the wrong kind, refused in one line before anything loads (not an AttributeError deep inside)."""
    if not isinstance(config, ReductionConfig):
        raise ConfigError(f"config must be a ReductionConfig, e.g. ReductionConfig(key_dim=96); got "
                          f"{type(config).__name__}")
    if not isinstance(model_or_name, (str, Path)) and not hasattr(getattr(model_or_name, "config", None),
                                                                  "model_type"):
        raise UsageError(f"model_or_name must be a model folder, hub id or alias, or a transformers model; got "
                         f"{type(model_or_name).__name__}")
    if isinstance(tokenizer, type):  # AutoTokenizer itself: a TypeError from inside the calibration, after loading
        raise UsageError(f"tokenizer must be the model's tokenizer, not the class {tokenizer.__name__}: pass "
                         f"{tokenizer.__name__}.from_pretrained(...) of the model's checkpoint")
    if tokenizer is not None and not callable(tokenizer):
        raise UsageError(f"tokenizer must be the model's tokenizer (e.g. AutoTokenizer.from_pretrained(...)); got "
                         f"{type(tokenizer).__name__}")


def check_gate(max_drop, evaluate) -> float | None:
    """``max_drop`` bounds the drop on the ``evaluate`` task: a finite number, and only with a task. Returned as a
    Python number."""
    if max_drop is None:
        return None
    from .reduction.config import _number

    max_drop = _number(named("--max-drop"), max_drop, 0)  # a negative bound asks the reduced model to beat the original
    if evaluate is None:
        needs = named("--max-drop needs --eval TASK (compress: evaluate=TASK)", "max_drop needs evaluate=TASK")
        raise ConfigError(f"{needs}, the task whose metric it bounds")
    return max_drop


def eval_calibration(config: ReductionConfig, evaluate: str | None, weights_only, data_dir,
                     texts: Texts | None = None) -> ReductionConfig:
    """``config``, calibrated on ``evaluate``'s train sentences when it has no calibration of its own (no labels are
    read): a classifier reduced from its weights alone collapses (docs/results.md). ``weights_only`` keeps it so."""
    from .reduction.config import _flag

    _flag("weights_only", weights_only)  # 'no' is a true value: it would skip the calibration asked for
    if weights_only:
        if config.calibration is not None or texts is not None:
            raise ConfigError(f"{named('--weights-only', 'weights_only=True')} and "
                              f"{named('--calibrate', 'a calibration')} contradict each other; drop one")
        return config
    if config.calibration is not None or texts is not None or not evaluate:
        return config
    check_task_train(evaluate, data_dir)
    return replace(config, calibration=Calibration(evaluate, seed=config.seed))


def check_task_train(task_name: str, data_dir) -> None:
    """Refuse an --eval task whose train sentences cannot be read for calibration (not a silent fall back to the
    weights alone). A bad task, or a dev split that cannot be read, fails here too, before any work."""
    from .eval.data import load_examples
    from .eval.tasks import get_task

    task = get_task(task_name)
    load_examples(task, "validation", data_dir=data_dir, limit=1)
    try:
        load_examples(task, "train", data_dir=data_dir, limit=1)
    except UsageError as err:
        raise UsageError(f"{given('--eval', task_name, 'evaluate')} calibrates on its train sentences, which cannot be "
                         f"read ({err}); pass "
                         f"{named('--calibrate SOURCE', 'ReductionConfig(calibration=Calibration(SOURCE))')} (another "
                         f"task's train split, or a .txt / .jsonl of unlabelled text like the model's inputs), or "
                         f"{named('--weights-only', 'weights_only=True')} to reduce from the weights alone") from None


def notifier(on_progress) -> Callable[[Progress], None]:
    """The progress callback of a Python call (a no-op for None); one that cannot be called is refused in one line,
    not a TypeError at the first event."""
    from .errors import check_callback

    check_callback("on_progress", on_progress, "one Progress event")
    return on_progress or (lambda event: None)


def _calibration_texts(config: ReductionConfig, texts: Texts | None, data_dir) -> list[tuple[str, ...]] | None:
    """Calibration sequences, read before the model loads so that a bad source fails at once."""
    if texts is not None:
        if config.calibration is None:
            raise ConfigError("calibration texts were given but the config has no calibration: pass "
                              "ReductionConfig(..., calibration=Calibration(source='python'))")
        hint = "pass a list of strings (or of sentence pairs: tuples of two strings), e.g. calibration=['a text', ...]"
        if not ordered(texts):  # not a list of letters, nor one without an order (a set: another sample under
            # another PYTHONHASHSEED) or of a dict's keys
            raise ConfigError(f"calibration texts must be a list of texts; got {type(texts).__name__} {texts!r:.40}; "
                              f"{hint}")
        texts = [(t,) if isinstance(t, str) else tuple(t) if isinstance(t, (tuple, list)) else t for t in texts]
        if not texts or not all(isinstance(t, tuple) and 1 <= len(t) <= 2 and all(isinstance(s, str) for s in t)
                                for t in texts):
            raise ConfigError(f"calibration texts must be a non-empty list of strings or pairs of strings; {hint}")
        from .calibration import SURROGATE, encodable

        broken = next((i for i, t in enumerate(texts) if not all(map(encodable, t))), None)
        if broken is not None:
            raise UsageError(f"calibration text {broken}: {SURROGATE}; fix or drop it")
        texts = [kept for kept in (tuple(s for s in t if s.strip()) for t in texts) if kept]  # as the .txt and
        if not texts:  # .jsonl readers skip blank lines and empty fields
            raise ConfigError(f"every calibration text is empty; {hint}")
        return texts
    if config.calibration is None:
        return None
    if config.calibration.source == "python":
        raise ConfigError("the calibration source is 'python' but no texts were given: pass them, "
                          "compress(..., calibration=['a text', ...])")
    from .calibration import calibration_texts

    c = config.calibration
    return calibration_texts(c.source, c.samples, seed=c.seed, data_dir=data_dir)


def _scorer(task: str | None, data_dir, batch_size: int, device):
    if task is None:
        return None
    from .eval.compare import Scorer

    return Scorer.for_task(task, data_dir=data_dir, batch_size=batch_size, device=device or "cpu")


def _load(model_or_name, tokenizer, allow_pickle: bool, device, notify):
    """(model, tokenizer, source folder or hub id, name): load a name, or take a model object as it is."""
    if isinstance(model_or_name, (str, Path)):
        from .hub import load_pretrained

        name = str(model_or_name)
        notify(Progress(f"loading {name}"))
        if device is None:
            from .devices import resolve_device

            device = str(resolve_device("auto"))
        model, loaded_tokenizer, source = load_pretrained(name, allow_pickle=allow_pickle, device=device)
        _check_no_head_dropped(model, name)
        return model, tokenizer or loaded_tokenizer, source.location, name
    model = model_or_name
    _own_config(model)
    if device is not None:
        model.to(device)
    path = getattr(model.config, "_name_or_path", "") or ""
    source = path if path and Path(path).is_dir() else None
    if source is not None and not hasattr(model, "sentence_head"):
        _read_sentence_head(model, Path(source))
    return model.eval(), tokenizer, source, path or type(model).__name__


def _check_pooling(pooling) -> None:
    from .reduction.objectives import POOLING

    if pooling is not None and pooling not in POOLING:
        raise ConfigError(f"pooling must be one of {', '.join(map(repr, POOLING))} (how the sentence embedding is "
                          f"read), or None to read it from the model's folder; got {pooling!r}")


def _set_pooling(model, pooling: str) -> None:
    """The sentence embedding read as ``pooling`` says, in place of what the folder said (its Dense layer kept)."""
    from .hub import SentenceHead

    head = getattr(model, "sentence_head", None)
    model.sentence_head = replace(head, pooling=pooling) if head is not None else SentenceHead(pooling)


def _own_config(model) -> None:
    """Give the model a config of its own before the reduction writes to it (model type, compression block): models
    built from one config object share it, and the others would save as reduced models without reduced layers."""
    import copy

    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():  # the encoder inside a classifier keeps a reference of its own
        if getattr(module, "config", None) is shared:
            module.config = own


def _read_sentence_head(model, folder: Path) -> None:
    """A model object loaded from a folder by transformers gets the folder's sentence-transformers pooling, as
    ``load_pretrained`` gives it: calibrated at the tokens its embedding reads (a CLS-pooled encoder at its first
    token). A model type mhacompress does not know is left for the reduction to refuse by name."""
    from .hub import sentence_head
    from .reduction.modeling import UnsupportedModelError, arch_for

    try:
        width = getattr(model.config, arch_for(model.config).hidden)
    except UnsupportedModelError:
        return
    model.sentence_head = sentence_head(folder, width)


def _check_no_head_dropped(model, name: str) -> None:
    """A checkpoint fine-tuned with a head other than sequence classification is read as its bare encoder: refuse it
    rather than save a model without its head. Pre-training heads (masked LM: bert-base-uncased) are meant to go."""
    for architecture in getattr(model.config, "architectures", None) or []:
        if re.search(r"For(TokenClassification|QuestionAnswering|MultipleChoice)$", architecture):
            raise UsageError(f"{name} holds a {architecture} head, which would be dropped: mhacompress keeps encoders "
                             f"and sequence-classification heads only; save its encoder (model.base_model) with "
                             f"save_pretrained and reduce that")


def _batches(model, tokenizer, texts: list[tuple[str, ...]], calibration: Calibration) -> list[dict]:
    """Tokenized calibration batches on the model's device: whole examples for a classifier; for a sentence encoder
    the sentences of the pairs, one sequence each, ``samples`` of them (seeded)."""
    from .eval.runner import batches, usable_length
    from .reduction.modeling import is_classifier

    if not is_classifier(model):
        texts = [(s,) for t in texts for s in t]
        if len(texts) > calibration.samples:
            keep = sorted(random.Random(calibration.seed).sample(range(len(texts)), calibration.samples))
            texts = [texts[i] for i in keep]
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in enc.items()}
            for _, enc in batches(tokenizer, texts, batch_size=calibration.batch_size,
                                  max_length=usable_length(model, calibration.max_length), model=model)]


def _used_length(config: ReductionConfig, model) -> ReductionConfig:
    """``config`` with its calibration's max length as the batches used it: capped to the model's positions."""
    from .eval.runner import usable_length

    c = config.calibration
    used = None if c is None else usable_length(model, c.max_length)
    if c is None or used == c.max_length or used < 8:  # below Calibration's floor: left as asked
        return config
    return replace(config, calibration=replace(c, max_length=used))


def _allocate(model, config: ReductionConfig, batches, notify) -> tuple[list[int], list[dict]]:
    """Per-layer key dims for ``config.budget``, or around an allocated ``config.key_dim`` (its Q/K parameters in
    every layer): by the measured effect on the model's output when calibrated bottom-up
    (reduction/sensitivity.py), else by each layer's score or weight error (reduction/allocate.py)."""
    from .reduction.allocate import allocate, budget_key_dims, budget_parameters, candidate_dims
    from .reduction.surgery import model_shape

    layers, heads, head_dim = model_shape(model)
    if config.allocate:  # a key dim the model cannot take (beyond H*dh, not a multiple of H for svd) fails first
        config.check_key_dims([config.key_dim], heads, head_dim)
    if config.allocate and config.key_dim >= heads * head_dim:  # nothing to spread: every layer at full width
        return [config.key_dim] * layers, None
    if config.allocate:  # the Q/K parameters of key_dim in every layer, spread over the layers
        _, cost = budget_parameters(model, config.method, 1.0)
        allowed, uniform = layers * cost(config.key_dim), config.key_dim
    else:
        allowed, cost = budget_parameters(model, config.method, config.budget)  # too small fails before calibration
        uniform = max((k for k in range(1, heads * head_dim + 1) if layers * cost(k) <= allowed), default=1)
    c = config.calibration
    if c is not None and c.sequential:
        from .fsio import scratch_dir
        from .reduction.sensitivity import SENSITIVITY_SEQUENCES, candidates, output_curves

        with scratch_dir("mhacompress-sensitivity-") as work:  # see _reduce
            curves = output_curves(model, config, candidates(model, config.method, uniform),
                                   _first_sequences(batches, SENSITIVITY_SEQUENCES), _plan(c, model),
                                   on_progress=_stages(notify), workdir=str(work))
        dims = allocate([{k: e ** 0.5 for k, e in curve.items()} for curve in curves], cost, allowed)  # sums e
        return dims, [{str(k): e for k, e in curve.items()} for curve in curves]
    moments = None
    if c is not None:
        from .reduction.calibrate import second_moments

        moments = second_moments(model, batches)
    total, done = layers * len(candidate_dims(heads, head_dim, config.method)), [0]

    def step():
        done[0] += 1
        notify(Progress("error curves", done[0], total))

    dims, curves = budget_key_dims(model, config, config.budget, moments, on_step=step)
    return dims, [{str(k): e for k, e in c.items()} for c in curves]


def _plan(c: Calibration, model):
    """The sequential reduction's plan for ``model`` from its calibration settings."""
    from .reduction.sequential import Plan

    return Plan(objective=c.objective, compensate=c.compensate, refine_steps=c.refine_steps,
                first_token_last=_read_at_first_token(model))


def _read_at_first_token(model) -> bool:
    """Whether ``model`` is read at the first token of its last layer alone: a classifier's head, a CLS-pooled
    sentence encoder (else at every token: a mean- or max-pooled one)."""
    from .reduction.modeling import is_classifier
    from .reduction.objectives import pooling_of

    return is_classifier(model) or pooling_of(model) == "cls"


def _stages(notify) -> Callable[[str, int, int], None]:
    """The reduction modules' (stage, done, total) callback, as Progress events."""
    return lambda stage, done, total: notify(Progress(stage, done, total))


def _first_sequences(batches: list[dict], count: int) -> list[dict]:
    """The leading batches holding ``count`` sequences (the last one cut to size)."""
    out, left = [], count
    for batch in batches:
        if left <= 0:
            break
        n = batch["attention_mask"].shape[0]
        out.append(batch if n <= left else {k: v[:left] for k, v in batch.items()})
        left -= n
    return out


def _reduce(model, config: ReductionConfig, dims: list[int], batches, notify) -> tuple[list[dict], list[str]]:
    """Decompose every layer in place: from the weights, from the original's moments, or sequentially."""
    from .reduction.surgery import reduce_layers_

    c = config.calibration
    if c is not None and c.sequential:
        from .fsio import scratch_dir
        from .reduction.sequential import reduce_sequential_

        # the reduction spills its activations into a temporary folder of its own, made inside one that is removed
        # with signals held back: a second Ctrl-C during the removal cannot leave them in the temporary folder
        with scratch_dir("mhacompress-calibration-") as work:
            plan = reduce_sequential_(model, config, dims, batches, _plan(c, model), on_progress=_stages(notify),
                                      workdir=str(work))
        return plan.reports, plan.modified
    moments = None
    if c is not None:
        from .reduction.calibrate import second_moments

        notify(Progress("calibrating"))
        moments = second_moments(model, batches)
    done = [0]

    def step(report):
        done[0] += 1
        notify(Progress("layers", done[0], len(dims)))

    return reduce_layers_(model, config, dims, moments, on_layer=step), []


def _report(name, source, config: ReductionConfig, block: dict, params_before: int, model, curves, evaluated,
            warnings, seconds: float, sequences: int | None) -> dict:
    """The ``reduce --json`` object (``output`` None until the model is saved); ``sequences``: how many the
    calibration used (its ``samples`` is what was asked for)."""
    from .reduction import cost
    from .schema import envelope

    layers = block["layers"]
    shapes = cost.layer_shapes(model)
    totals = cost.compare(cost.original_shapes(shapes), shapes, 128)["total"]
    device = next(model.parameters()).device
    out = {
        **envelope("reduce", device),
        "model": name,
        "source": source or name,
        "method": config.method,
        "solver": config.solver,
        "key_dim": config.key_dim,
        "key_dims": [x["key_dim"] for x in layers],
        "calibration": None if config.calibration is None else {**asdict(config.calibration), "sequences": sequences},
        "budget": None if curves is None else {"fraction": config.budget, "curves": curves},
        "seconds": round(seconds, 3),
        "params": {"before": sum(x["qk_params_before"] for x in layers),
                   "after": sum(x["qk_params_after"] for x in layers)},
        "model_params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "cost": {"seq_len": 128, **totals},
        "layers": layers,
        "modified": block["modified"],
        "first_token_only": config.first_token_only,
        "config": config.to_dict(),
        "warnings": warnings,
    }
    if evaluated:
        out["eval"] = evaluated
    out["output"] = None  # the folder written: set by saving (Compressed.save, compress(output=...))
    return out


def _check_finite(model, calibrated: bool) -> None:
    """A reduction never hands back NaN or infinite weights (a saved model would answer NaN without a word); the
    advice fits the run (``calibrated``: its data's options; without calibration, the weights themselves).

    Only the transformer layers are read, which hold every weight a reduction writes: reading a 250k-token embedding
    (1 GB at XLM-R-large size) would add to the run's time and peak memory. ``nonfinite_weights`` gives each
    weight's memory-mapped pages back once read (the save reads them again)."""
    from .reduction.modeling import arch_for, layers
    from .reduction.surgery import nonfinite_weights

    prefix = arch_for(model.config).layers
    bad = [f"{prefix}.{i}.{name}" for i, layer in enumerate(layers(model)) for name in nonfinite_weights(layer)]
    if not bad:
        return
    where = f"the reduction produced non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}), nothing " \
            f"was written"
    if calibrated:
        raise UsageError(f"{where}; retry with more {named('--samples', 'Calibration samples')} or "
                         f"{named('--uniform', 'allocate=False')}, or report this with the command you ran")
    # weights only: the solvers saw nothing but the weights, finite (checked on loading), so too large to decompose
    raise UsageError(f"{where}: the query/key weights are too large to decompose; check the checkpoint's query/key "
                     f"weights (scaled up by mistake, or a training run that diverged), or pass a larger key dim")
