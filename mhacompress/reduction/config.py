"""One validated description of a reduction, saved with the weights so that a model says exactly how it was made.

Every field is typed and checked on creation; an impossible value raises ``ConfigError`` (a ValueError) whose
message is what the CLI prints. ``to_dict`` / ``from_dict`` round-trip through the saved compression block.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Set
from dataclasses import asdict, dataclass, fields, replace

from ..errors import ConfigError, given, named
from . import methods
from .modeling.architectures import FORMAT_VERSION

INITS = ("svd", "random")
OBJECTIVES = ("output", "score")  # what the sequential reduction fits (see reduction/objectives.py)
REFINE_STEPS = 200  # refinement steps per layer by default (ReductionConfig.refines) for a model read at its ...
# ... last layer's first token (classifiers): 400 gained nothing measurable there at 10-35% more time; for a model
# read at every token (a mean- or max-pooled sentence encoder) 400 bring the encoder's STS-B figures closer at d/8
# (dev, train and eight text sets, on every seed measured) and at d/4 (the eight-set distance on every one of six
# seeds, dev and train on average; docs/results.md)
TOKEN_REFINE_STEPS = 400
REFINE_RULE = 3  # the refines / allocates rule, counted up when it changes (2: TOKEN_REFINE_STEPS at d/4 too; 3: a
# classifier at d/4 where cheap is allocated, not refined)
# the costliest model whose d/4 default spends more than the closed form (refinement, or a classifier's allocation):
# multiply-adds per token of one refinement step, summed over the layers (ReductionConfig.step_cost). MiniLM-L6 at
# d/4: 1.3 M (the steps add ~35 s on 2 cores, MRPC); MiniLM-L12: 2.7 M; DistilBERT: 5.3 M; BERT-base: 10.6 M, where
# 200 steps would more than double its 63 s
REFINE_COST = 3_000_000

SEED_MAX = 2**32 - 1  # numpy's RandomState (tensorly's solvers) takes no larger seed; torch's generators 2**64 - 1


def _plain(value):
    """A numpy (or other registered) integer or real scalar as the Python int or float it holds; anything else as
    it is. A config is saved as JSON with the weights, and its checks are written for Python numbers."""
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value  # (numpy's float64 is a float subclass: made a plain float too, so its repr is a number's)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def ordered(value) -> bool:
    """Whether ``value`` is a sequence whose order means something (a list, tuple, numpy array, generator), not a
    str or bytes (read letter by letter), a set (another order under another PYTHONHASHSEED) or a mapping."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Set, Mapping))


def _plain_fields(config, names: tuple[str, ...]) -> None:
    for name in names:
        object.__setattr__(config, name, _plain(getattr(config, name)))


def _int(name: str, value, low: int = 0, high: int | None = None) -> int:
    """``value`` as a Python int (a numpy integer taken as the int it holds), refused unless an integer in
    ``low`` .. ``high``."""
    value = _plain(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        upto = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{name} must be an integer >= {low}{upto}; got {value!r}")
    return value


def _number(name: str, value, low: float | None = None, high: float | None = None, *, above: bool = False) -> float:
    """``value`` as a Python number (a numpy scalar taken as the int or float it holds), refused unless a finite real
    number >= ``low`` (> with ``above``) and <= ``high``: nan and inf are refused too (every comparison with nan is
    False, so a range check alone lets it through)."""
    value = _plain(value)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        bounds = ([] if low is None else [f"{'>' if above else '>='} {low:g}"]) + \
            ([] if high is None else [f"<= {high:g}"])
        raise ConfigError(f"{name} must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}; got {value!r}")
    return value


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}")


@dataclass(frozen=True)
class Calibration:
    """Data-aware reduction: which unlabelled sequences the layers are fitted on, and how.

    source:       a GLUE task name (its TRAIN split), a .txt file (one sequence a line) or a .jsonl file; ``"python"``
                  when the texts were handed to ``compress(..., calibration=[...])`` directly.
    samples:      sequences the model sees (sentences for a sentence encoder, whole examples for a classifier).
    seed:         which ``samples`` sequences are drawn from the source. None (default): the reduction's own seed
                  (``ReductionConfig.seed``, or ``run_sweep``'s ``seed``), so one seed decides everything, as the
                  CLI's ``--seed`` does.
    sequential:   reduce bottom-up, each layer fitted on the inputs the already-reduced layers produce, with the
                  ORIGINAL model's activations as targets (False: every layer from the original's inputs at once,
                  whitened by their second moments: the simplest data-aware rung).
    objective:    with ``sequential``: ``output`` fits the layer's attention output (the metric of the original
                  attention probabilities and values, centred, weighted by head and by how much each token reaches
                  the model's read-out); ``score`` fits the attention scores. Default: ``output``.
    compensate:   with ``sequential``: also refit each layer's attention output projection (and bias) by ridge least
                  squares, so the residual sum matches the original's; recorded in the block's ``modified`` list.
                  Default: on when sequential.
    refine_steps: with ``sequential``: Adam steps per layer fitting the reduced layer's attention output to the
                  original's (0: none). None (default): decided for the model by ``ReductionConfig.refines``:
                  ``TOKEN_REFINE_STEPS`` for a model read at every token (a sentence encoder) and ``REFINE_STEPS``
                  for one read at its first token (a classifier, a CLS-pooled encoder), at key dims <= d/8, where
                  the closed form alone leaves the most (docs/results.md), and at key dims <= d/4 where the steps
                  are cheap (MiniLM-sized models, ``REFINE_COST``), not where they would more than double the d/4
                  path (BERT-base size: 63 s); 0 above d/4, and 0 for a classifier that is allocated there
                  instead (``ReductionConfig.allocates``).
    """

    source: str
    samples: int = 512
    seed: int | None = None
    sequential: bool = True
    objective: str | None = None
    compensate: bool | None = None
    refine_steps: int | None = None
    max_length: int = 128
    batch_size: int = 32

    def __post_init__(self):
        _plain_fields(self, ("samples", "seed", "refine_steps", "max_length", "batch_size"))
        if isinstance(self.source, os.PathLike):  # a file, as a Path: kept as a str (the saved block is JSON)
            object.__setattr__(self, "source", os.fspath(self.source))
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("the calibration source must be a GLUE task name or a .txt / .jsonl file")
        _int(named("--samples"), self.samples, 1)
        if self.seed is not None:
            _int("the calibration seed", self.seed, 0, SEED_MAX)
        if self.refine_steps is None and not self.sequential:
            object.__setattr__(self, "refine_steps", 0)  # nothing to refine without the bottom-up targets
        if self.refine_steps is not None:
            _int("refine_steps (--refine)", self.refine_steps)
        _int("the calibration max length", self.max_length, 8)
        _int("the calibration batch size", self.batch_size, 1)
        _flag("sequential", self.sequential)
        if self.objective is None:  # the strongest label-free path unless asked otherwise
            object.__setattr__(self, "objective", "output" if self.sequential else "score")
        if self.compensate is None:
            object.__setattr__(self, "compensate", self.sequential)
        _flag("compensate", self.compensate)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{named('--objective')} must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not self.sequential and (self.objective != "score" or self.compensate or self.refine_steps):
            raise ConfigError("--objective output, --compensate and --refine fit layers bottom-up: drop --parallel "
                              "(sequential=False in Python)")

    def seeded(self, seed: int) -> "Calibration":
        """This calibration with the reduction's ``seed`` where it names none of its own."""
        _int(named("--seed"), seed, 0, SEED_MAX)
        return self if self.seed is not None else replace(self, seed=seed)


@dataclass(frozen=True)
class ReductionConfig:
    """How to reduce every self-attention layer of a model.

    Exactly one of:
      key_dim   shared query/key width D~k for every layer (1 .. H*dh; a multiple of H for ``svd``);
      key_dims  one key dim per layer;
      budget    a fraction 0 < F <= 1 of the original Q/K parameters, spread over layers where it costs least.
    method:      a registered method (``mhacompress.reduction.methods.names()``: cp, tucker, svd).
    solver:      ``structured`` (fast, never builds the score tensor) or ``tensorly`` (the reference: tensorly's
                 parafac / partial_tucker on the dense, whitened when calibrated, tensor).
    n_iter_max, tol, init, seed: the solver's settings (tensorly's names); the same seed gives bit-identical weights.
    calibration: a ``Calibration``, or None to reduce from the weights alone.
    allocate:    with ``key_dim`` and a sequential calibration: ``key_dim`` is the AVERAGE, and the per-layer key dims
                 are chosen under the Q/K parameters of ``key_dim`` everywhere by the measured effect of each layer on
                 the model's output (reduction/sensitivity.py). False: ``key_dim`` in every layer (``--uniform``).
                 None (default): decided for the model by ``allocates``: on at key dims <= d/8, where it pays
                 (docs/results.md: fine-tuned MiniLM average drop 4.17 -> 1.74 at d/8), and for a classifier at key
                 dims <= d/4 where the model is small (``REFINE_COST``), in place of refinement: it lowered the dev
                 KL to the original on four of five fine-tuned MiniLM models at no more time (docs/method.md); off
                 above, and on larger models, where it costs several times the reduction. With ``budget``: None,
                 always (a budget is always allocated); with ``key_dims``: False.
    first_token_only: the exact [CLS] shortcut for sequence classifiers (see modeling.first_token_only_).
    """

    key_dim: int | None = None
    key_dims: tuple[int, ...] | None = None
    budget: float | None = None
    method: str = "cp"
    solver: str = "structured"
    n_iter_max: int = 100
    tol: float = 1e-5
    init: str = "svd"
    seed: int = 0
    calibration: Calibration | None = None
    first_token_only: bool = False
    allocate: bool | None = None

    def __post_init__(self):
        _plain_fields(self, ("key_dim", "budget", "n_iter_max", "tol", "seed"))
        if self.method not in methods.names():
            raise ConfigError(f"method must be one of {', '.join(methods.names())}; got {self.method!r}")
        if self.solver not in methods.SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(methods.SOLVERS)}; got {self.solver!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if sum(x is not None for x in (self.key_dim, self.key_dims, self.budget)) != 1:
            raise ConfigError("give exactly one of --key-dim, --key-dims or --budget (in Python: key_dim=, key_dims= "
                              "or budget=), e.g. --key-dim 96 (key_dim=96)")
        if self.key_dims is not None:  # in layer order: a list, tuple or other sequence (not a set, not one int)
            dims = self.key_dims
            dims = tuple(map(_plain, dims)) if ordered(dims) else ()
            if not dims:
                raise ConfigError(f"{named('--key-dims')} takes one positive integer per layer, in layer order (a list "
                                  f"or tuple); got {self.key_dims!r}")
            object.__setattr__(self, "key_dims", dims)
        for k in self.key_dims or (() if self.key_dim is None else (self.key_dim,)):
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"key dims must be positive integers; got {k!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not 0 < self.budget <= 1):
            raise ConfigError(f"{named('--budget')} is a fraction of the original Q/K parameters: 0 < F <= 1, got "
                              f"{self.budget!r}")
        _int("n_iter_max (--iterations)", self.n_iter_max, 1)
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) \
                or self.tol < 0:
            raise ConfigError(f"{named('--tol')} must be a finite number >= 0; got {self.tol!r}")
        _int(named("--seed"), self.seed, 0, SEED_MAX)
        _flag("first_token_only", self.first_token_only)
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise ConfigError(f"calibration must be a Calibration or None; got {type(self.calibration).__name__}")
        if self.calibration is not None:  # its sample drawn with this seed unless it names its own
            object.__setattr__(self, "calibration", self.calibration.seeded(self.seed))
        bottom_up = self.calibration is not None and self.calibration.sequential
        if self.allocate is None and self.key_dims is not None:
            object.__setattr__(self, "allocate", False)  # --key-dims: given, not allocated around one
        # with --key-dim, None stays None until the model is known (allocates): a calibration added later, as
        # compress(evaluate=TASK) adds its task's, still gets the default
        if self.allocate is not None:
            _flag("allocate", self.allocate)
        if self.budget is not None and self.allocate is not None:  # nothing to decide: a budget is always allocated
            option = named("--allocate", "allocate=True") if self.allocate else named("--uniform", "allocate=False")
            keep = "" if self.allocate else f", or give {named('--key-dim')} to keep one key dim in every layer"
            raise ConfigError(f"{given('--budget', self.budget)} is always allocated over the layers: drop {option}"
                              f"{keep}")
        if self.allocate and (self.key_dim is None or not bottom_up):
            raise ConfigError("allocating per-layer key dims around --key-dim needs --key-dim and a sequential "
                              "--calibrate; drop the allocation (--uniform, allocate=False in Python) or use --budget")

    def layer_key_dims(self, num_layers: int, num_heads: int, head_dim: int) -> list[int]:
        """The key dim of each layer, checked against the model's shape. Not for a budget (allocation decides)."""
        if self.allocates(num_heads * head_dim):  # always for a budget
            raise ConfigError(f"with {named('--budget')} (or an allocated {named('--key-dim')}) the key dims are "
                              f"chosen by allocation, which reduce_ does not do: call mhacompress.compress(model, "
                              f"config, tokenizer=...) instead, or give one key dim (key_dim=, allocate=False)")
        dims = list(self.key_dims) if self.key_dims is not None else [self.key_dim] * num_layers
        if len(dims) != num_layers:
            raise ConfigError(f"{len(dims)} key dims given for a model with {num_layers} layers; give one per layer, "
                              f"or one {named('--key-dim')} for all")
        self.check_key_dims(dims, num_heads, head_dim)
        return dims

    def check_key_dims(self, dims: list[int], num_heads: int, head_dim: int) -> None:
        """Refuse a key dim the method cannot take on this model's heads (svd: a multiple of H, ...)."""
        method = methods.get(self.method)
        for k in dims:
            problem = method.check_key_dim(k, num_heads, head_dim)
            if problem:
                raise ConfigError(problem)

    def allocates(self, width: int, layers: int | None = None, first_token: bool = False) -> bool:
        """Whether the key dims are allocated per layer for a model of ``layers`` layers of ``width`` = H*dh, read at
        its last layer's ``first_token`` alone or at every token: as set; by default with a sequential calibration,
        at key dims <= width / 8, and for a model read at its first token (a classifier) at key dims <= width / 4
        where the model is small (``cheap``), in place of refinement; always for a budget."""
        if self.budget is not None:
            return True
        if self.allocate is not None:
            return self.allocate
        bottom_up = self.calibration is not None and self.calibration.sequential  # else nothing to measure by
        return bottom_up and (self.deep(width) or (first_token and self.cheap(width, layers)))

    def cheap(self, width: int, layers: int | None) -> bool:
        """Whether this is a key dim <= width / 4 on a model small enough (``step_cost`` <= ``REFINE_COST``) that the
        d/4 default spends more than the closed form on it: refinement steps, or a classifier's allocation."""
        return layers is not None and self.deep(width, 4) and self.step_cost(width, layers) <= REFINE_COST

    def deep(self, width: int, part: int = 8) -> bool:
        """Whether this reduction keeps at most 1/``part`` of a ``width`` = H*dh model's query/key width (on average
        over the layers; a budget of at most 1/part). At an eighth the default path also allocates and refines."""
        if self.budget is not None:
            return self.budget * part <= 1
        dims = self.key_dims or (self.key_dim,)
        return sum(dims) * part <= width * len(dims)

    def step_cost(self, width: int, layers: int) -> float:
        """Multiply-adds per token of one refinement step summed over the ``layers``, forward: each layer's output
        projection (width^2) and its query and key projections (2 * width * key dim), mean key dim over the layers.
        The backward pass costs about twice as much again, alike for every model."""
        dims = [self.budget * width] if self.budget is not None else list(self.key_dims or (self.key_dim,))
        return layers * (width * width + 2 * width * sum(dims) / len(dims))

    def refines(self, width: int, layers: int, first_token: bool = False) -> int:
        """The refinement steps per layer for a model of ``layers`` layers of ``width`` = H*dh, read at its last
        layer's ``first_token`` alone (a classifier, a CLS-pooled encoder) or at every token: as set in the
        calibration; by default with a sequential calibration, ``REFINE_STEPS`` read at the first token and
        ``TOKEN_REFINE_STEPS`` read at every token, at key dims <= width / 8 (``deep``) and at key dims <= width / 4
        where the steps are cheap (``step_cost`` <= ``REFINE_COST``: MiniLM-sized models, not BERT-base); else
        none (a parallel calibration's steps are 0 already: ``Calibration``)."""
        c = self.calibration
        if c is None:
            return 0
        if c.refine_steps is not None:
            return c.refine_steps
        steps = REFINE_STEPS if first_token else TOKEN_REFINE_STEPS
        if self.deep(width):
            return steps
        if not self.cheap(width, layers) or (first_token and self.allocates(width, layers, first_token)):
            return 0  # a classifier allocated at d/4: the allocation takes the steps' time, and gains more
        return steps

    def decided(self, width: int, layers: int, first_token: bool = False) -> ReductionConfig:
        """This config with what it leaves to the model decided for one of ``layers`` layers of ``width`` = H*dh,
        read at its last layer's ``first_token`` or at every token (``allocates``, ``refines``): what the reduction
        did, as it is saved with the weights."""
        config = self if self.budget is not None else \
            replace(self, allocate=self.allocates(width, layers, first_token))  # a budget's: None
        if config.calibration is None:
            return config
        steps = self.refines(width, layers, first_token)
        return replace(config, calibration=replace(config.calibration, refine_steps=steps))

    def solver_options(self) -> dict:
        """What ``Method.solve`` takes: the solver and its settings (tensorly's names)."""
        return {"solver": self.solver, "n_iter_max": self.n_iter_max, "tol": self.tol, "init": self.init,
                "random_state": self.seed}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["key_dims"] = list(self.key_dims) if self.key_dims is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ReductionConfig":
        """The config saved in a compression block (format 1 or 2); unknown settings are an error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the reduction settings must be an object; got {type(data).__name__}")
        data = dict(data)
        extra = data.pop("extra", None) or {}  # format 1 kept calibration and budget here
        if not isinstance(extra, Mapping):
            raise ConfigError(f"the format-1 extra settings must be an object; got {type(extra).__name__}")
        if "calibration" in extra and data.get("calibration") is None:
            old = extra["calibration"]
            if not isinstance(old, Mapping) or not {"source", "samples"} <= set(old):
                raise ConfigError(f"the format-1 calibration settings need a source and samples; got {old!r}")
            data["calibration"] = {"source": old["source"], "samples": old["samples"],
                                   "refine_steps": old.get("refine_steps", 0), "sequential": False,
                                   "compensate": False}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown reduction settings {sorted(unknown)} (written by a newer mhacompress?)")
        calibration = data.get("calibration")
        if isinstance(calibration, dict):
            names = {f.name for f in fields(Calibration)}
            if set(calibration) - names:
                raise ConfigError(f"unknown calibration settings {sorted(set(calibration) - names)}")
            # saved before these settings existed: neither compensated nor refined
            calibration = {"compensate": False, "refine_steps": 0, **calibration}
            if calibration.get("sequential", True):
                calibration.setdefault("objective", "score")
            data["calibration"] = _saved_seed(Calibration, calibration)
        if data.get("budget") is not None and data.get("allocate") is False:
            del data["allocate"]  # saved before a budget's was left None (it was overwritten to false)
        elif data.get("budget") is None:
            data.setdefault("allocate", False)  # saved before allocation existed: uniform
        if isinstance(data.get("key_dims"), list):
            data["key_dims"] = tuple(data["key_dims"])
        return _saved_seed(cls, data)


SAVED_SEED_MAX = 2**64 - 1  # what folders saved before SEED_MAX existed may hold (torch's generators' limit)


def _saved_seed(cls, data: dict):
    """``cls(**data)`` for a config read back from a saved folder: a seed above SEED_MAX (accepted before the solvers'
    limit was enforced, and harmless for the svd init) is provenance, kept as saved rather than refusing the folder."""
    seed = data.get("seed", 0)
    if isinstance(seed, int) and not isinstance(seed, bool) and SEED_MAX < seed <= SAVED_SEED_MAX:
        made = cls(**{**data, "seed": 0})
        object.__setattr__(made, "seed", seed)
        return made
    return cls(**data)


def compression_block(config: ReductionConfig, *, source: str, layers: list[dict], tool_version: str,
                      base_architecture: str, base_model_type: str, modified: list[str] = ()) -> dict:
    """The ``compression`` entry of a saved config.json."""
    method = methods.get(config.method)
    return {
        "format_version": FORMAT_VERSION,
        "tool": "mhacompress",
        "tool_version": tool_version,
        "source_model": source,
        "base_architecture": base_architecture,
        "base_model_type": base_model_type,
        "method": config.method,
        "layout": method.layout,
        "key_dim": None if config.allocate else config.key_dim,  # the layers' own, when they share one
        "reduction": config.to_dict(),
        "layers": layers,  # [{"index", "key_dim", "relative_error", ...}]
        "modified": list(modified),  # weights changed beyond query/key (e.g. compensated output projections)
        "first_token_only": config.first_token_only,
    }
