"""One validated description of a reduction, saved with the weights so a model says exactly how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .modeling import FORMAT_VERSION, METHODS

INITS = ("svd", "random")


class ConfigError(ValueError):
    """An impossible reduction setting (the message says which and what is allowed)."""


@dataclass(frozen=True)
class ReductionConfig:
    """How to reduce every self-attention layer of a model.

    key_dim:  shared query/key width D~k (1 .. H*dh; a multiple of H for ``svd``). ``None`` with ``key_dims`` given.
    key_dims: one key dim per layer, overriding ``key_dim``.
    method:   ``cp`` (collaborative heads), ``tucker`` (shared U, V and a per-head core) or ``svd`` (per-head
              truncated SVD: shrinks each head instead of sharing; the baseline).
    n_iter_max, tol, init, seed: the solver's settings (tensorly's names); the same seed gives bit-identical weights.
    """

    key_dim: int | None = None
    method: str = "cp"
    key_dims: tuple[int, ...] | None = None
    n_iter_max: int = 100
    tol: float = 1e-5
    init: str = "svd"
    seed: int = 0
    extra: dict = field(default_factory=dict)  # provenance filled by the caller (e.g. calibration source)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if (self.key_dim is None) == (self.key_dims is None):
            raise ConfigError("give exactly one of key_dim or key_dims")
        for k in self.key_dims or (self.key_dim,):
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"key dims must be positive integers; got {k!r}")
        if self.n_iter_max < 0 or self.tol < 0:
            raise ConfigError("n_iter_max and tol must be non-negative")
        if self.key_dims is not None:
            object.__setattr__(self, "key_dims", tuple(int(k) for k in self.key_dims))

    def layer_key_dims(self, num_layers: int, num_heads: int, head_dim: int) -> list[int]:
        """The key dim of each layer, checked against the model's shape (1 .. H*dh, svd: multiples of H)."""
        dims = list(self.key_dims) if self.key_dims is not None else [self.key_dim] * num_layers
        if len(dims) != num_layers:
            raise ConfigError(f"{len(dims)} key dims given for a model with {num_layers} layers")
        top = num_heads * head_dim
        for k in dims:
            if not 1 <= k <= top:
                raise ConfigError(f"key dim {k} is out of range: this model takes 1..{top} ({num_heads} heads x {head_dim})")
            if self.method == "svd" and k % num_heads:
                raise ConfigError(f"--method svd splits the key dim over {num_heads} heads: {k} is not a multiple of "
                                 f"{num_heads}")
        return dims

    def solver_options(self) -> dict:
        if self.method == "svd":
            return {}
        return {"n_iter_max": self.n_iter_max, "tol": self.tol, "init": self.init, "random_state": self.seed}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["key_dims"] = list(self.key_dims) if self.key_dims is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ReductionConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def compression_block(config: ReductionConfig, *, source: str, layers: list[dict], tool_version: str) -> dict:
    """The ``compression`` entry of a saved config.json."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": "mhacompress",
        "tool_version": tool_version,
        "source_model": source,
        "method": config.method,
        "key_dim": config.key_dim,
        "reduction": config.to_dict(),
        "layers": layers,  # [{"index", "key_dim", "relative_error", ...}]
    }
