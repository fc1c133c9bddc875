"""mhacompress: post-hoc compression of transformer attention (collaborative multi-head attention, no retraining).

    import mhacompress
    from mhacompress import Calibration, ReductionConfig

    result = mhacompress.compress("minilm", ReductionConfig(key_dim=96, calibration=Calibration("mrpc")),
                                  data_dir="glue_data")     # load, calibrate, reduce: what `mhacompress reduce` does
    result.save("out/minilm-cp96")
    model, tokenizer = mhacompress.load("out/minilm-cp96")

    mhacompress.reduce_(model, ReductionConfig(key_dim=96))  # in place, from the weights alone
"""

__version__ = "0.2.0"

__all__ = ["Calibration", "Compressed", "Progress", "ReductionConfig", "__version__", "compress", "load", "reduce_",
           "save"]

_LAZY = {  # keep `import mhacompress` (and so `mhacompress --help`) free of torch
    "load": "hub", "save": "hub", "reduce_": "reduction.surgery", "ReductionConfig": "reduction.config",
    "Calibration": "reduction.config", "compress": "pipeline", "Compressed": "pipeline", "Progress": "pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mhacompress' has no attribute {name!r}")
