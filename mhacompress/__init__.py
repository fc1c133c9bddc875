"""mhacompress: post-hoc compression of transformer attention (collaborative multi-head attention, no retraining).

    import mhacompress
    model, tokenizer = mhacompress.load("out/minilm-cp96")      # a folder written by `mhacompress reduce`

    from mhacompress import ReductionConfig, reduce_
    reduce_(model, ReductionConfig(key_dim=96, method="cp"))    # in place, any supported HF encoder
"""

__version__ = "0.1.0"

__all__ = ["ReductionConfig", "__version__", "load", "reduce_", "save"]


def __getattr__(name):  # keep `import mhacompress` (and so `mhacompress --help`) free of torch
    if name in ("load", "save"):
        from . import hub

        return getattr(hub, name)
    if name == "reduce_":
        from .compress.surgery import reduce_

        return reduce_
    if name == "ReductionConfig":
        from .compress.config import ReductionConfig

        return ReductionConfig
    raise AttributeError(f"module 'mhacompress' has no attribute {name!r}")
