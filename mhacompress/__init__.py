"""mhacompress: post-hoc compression of transformer attention (collaborative multi-head attention, no retraining).

    import mhacompress
    from mhacompress import Calibration, ReductionConfig

    result = mhacompress.compress("minilm", ReductionConfig(key_dim=96, calibration=Calibration("mrpc")),
                                  data_dir="glue_data", output="out/minilm-cp96")  # `mhacompress reduce --json`
    result.model, result.report                              # a Compressed: the model, tokenizer and report
    model, tokenizer = mhacompress.load("out/minilm-cp96")

    mhacompress.reduce_(model, ReductionConfig(key_dim=96))  # in place, from the weights alone
    mhacompress.save(model, tokenizer, "out/minilm-w96")     # atomically, reloadable without mhacompress

    mhacompress.evaluate("out/minilm-cp96", "stsb", data_dir="glue_data")   # `mhacompress eval --json`
    mhacompress.evaluate(result.model, "mrpc", tokenizer=result.tokenizer)  # a model in memory, as it is
    mhacompress.report("out/minilm-cp96")                                    # `mhacompress report --json`
    mhacompress.to_onnx("out/minilm-cp96", "out/minilm-cp96.onnx")           # `mhacompress export --json`
    mhacompress.run_sweep("minilm", "stsb", ["cp", "svd"], [192, 96], data_dir="glue_data")  # `sweep --json`
    mhacompress.finetune("minilm", "mrpc", "out/minilm-mrpc", data_dir="glue_data")        # `finetune --json`
    mhacompress.analyze("minilm", plot="out/analyze-minilm")                               # `analyze --json`

Each returns the dict the command prints with ``--json`` (``run_sweep``'s with its schema envelope, the others
without) and reports progress through a callback of ``Progress`` events (``on_progress``; ``on_result`` for
``run_sweep``). docs/usage.md lists every command option beside its Python argument. Bad input raises
``UsageError`` with the line the command prints; a bad setting its subclass ``ConfigError`` (also a ValueError),
on which the command exits 2.
"""

__version__ = "0.2.0"

__all__ = ["Calibration", "Compressed", "ConfigError", "Progress", "ReductionConfig", "UsageError", "__version__",
           "analyze", "compress", "evaluate", "finetune", "load", "reduce_", "report", "run_sweep", "save", "to_onnx"]

_LAZY = {  # keep `import mhacompress` (and so `mhacompress --help`) free of torch
    "load": "hub", "save": "hub", "reduce_": "reduction.surgery", "ReductionConfig": "reduction.config",
    "UsageError": "errors", "ConfigError": "errors",
    "Calibration": "reduction.config", "compress": "pipeline", "Compressed": "pipeline", "Progress": "pipeline",
    "evaluate": "commands", "report": "commands", "to_onnx": "commands", "finetune": "commands",
    "analyze": "commands",
    "run_sweep": "sweep:sweep",  # not `mhacompress.sweep`: importing the submodule would shadow it
}


def __dir__():  # the lazy names too, so that help(mhacompress) lists the calls and classes
    return sorted(set(__all__) | {name for name in globals() if name not in ("__getattr__", "__dir__")})


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(f".{module}", __name__), attr or name)
    raise AttributeError(f"module 'mhacompress' has no attribute {name!r}")
