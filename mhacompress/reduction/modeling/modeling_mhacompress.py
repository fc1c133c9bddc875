"""Entry points of a reduced model: install collaborative attention in a transformers model, the exact [CLS]
shortcut, and the classes that ``config.json``'s ``auto_map`` names.

This file and the ones it imports (architectures.py, attention.py, kernels.py) are copied into every reduced model
folder: ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` then rebuilds the model in a process that never
imports mhacompress. A reduced config says ``model_type: "mhacompress-bert"`` (etc.), so plain transformers refuses
the folder instead of loading an unreduced model with random query/key weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .architectures import COMPRESSION_KEY, FORMAT_VERSION, REDUCED_TYPE_PREFIX, arch_for, attention_modules, layers
from .attention import CollaborativeSelfAttention

METHOD_LAYOUTS = {"cp": "diagonal", "tucker": "core", "svd": "per-head"}  # format 1 blocks name a method only
REMOTE_CODE_FILES = ("modeling_mhacompress.py", "architectures.py", "attention.py", "kernels.py")
_ATTENTION_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}
_CONFIG_CLASSES: dict[type, type] = {}


def collaborative_class(original: type[nn.Module]) -> type[nn.Module]:
    """A subclass of both CollaborativeSelfAttention and the replaced class, so that transformers' output recorders
    (``output_attentions=True``), which match modules with isinstance, still find the attention layers."""
    if original not in _ATTENTION_CLASSES:
        _ATTENTION_CLASSES[original] = type("Collaborative" + original.__name__, (CollaborativeSelfAttention, original),
                                            {"__init__": CollaborativeSelfAttention.__init__})
    return _ATTENTION_CLASSES[original]


def layout_of(compression: dict) -> str:
    return compression.get("layout") or METHOD_LAYOUTS[compression["method"]]


def collaborate_(model: nn.Module, compression: dict) -> nn.Module:
    """Replace every self-attention module of ``model`` by an (uninitialised) collaborative one, in place.

    ``compression`` is the block saved in config.json: its layout and per-layer ``key_dim`` fix the shapes. The
    weights are filled by the reduction or by loading a saved state dict.
    """
    arch_for(model.config)  # unsupported architectures fail here
    version = compression.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"compression format {version} is newer than this code understands ({FORMAT_VERSION}); "
                         f"upgrade mhacompress")
    specs, found = compression["layers"], attention_modules(model)
    if len(specs) != len(found):
        raise ValueError(f"compression block describes {len(specs)} layers, the model has {len(found)}")
    for spec, (parent, name, old) in zip(specs, found):
        if not isinstance(old, CollaborativeSelfAttention):
            setattr(parent, name, collaborative_module(old, model.config, layout_of(compression), int(spec["key_dim"])))
    if compression.get("first_token_only"):
        first_token_only_(model)
    return model


def collaborative_module(old: nn.Module, config, layout: str, key_dim: int) -> CollaborativeSelfAttention:
    """An uninitialised collaborative module that takes over ``old``'s values (and output projection)."""
    arch = arch_for(config)
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing from the caller's RNG
        new = collaborative_class(type(old))(
            arch=arch, config=config, layout=layout, key_dim=key_dim, value=getattr(old, arch.value),
            output=getattr(old, arch.output) if arch.output else None,
        )
    ref = getattr(old, arch.value).weight
    new.train(old.training)  # a fresh module is in training mode: keep eval models deterministic (dropout off)
    return new.to(device=ref.device, dtype=ref.dtype)


def first_token_only_(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Exact shortcut for heads that read only the first token ([CLS]: every ``*ForSequenceClassification`` head of
    the architecture table, and BERT's pooler): the last layer computes attention for that query alone, and its
    feed-forward for that token alone. In place; recorded in the compression block so a saved model keeps it.

    The last collaborative module is switched to first-token queries (a setting, not per-call state), and the
    LayerNorm after it keeps only the first position (a stateless hook), so everything after it runs on one token.
    Afterwards ``last_hidden_state`` has length 1 (the first token, equal to the full model's); pooled outputs and
    classification logits are unchanged. Do not enable it for models read at every token (mean pooling, tagging).
    """
    last = layers(model)[-1]
    attn = attention_modules(model)[-1][2]
    if not isinstance(attn, CollaborativeSelfAttention):
        raise ValueError("the first-token shortcut needs a reduced model (collaborative attention in the last layer)")
    norm = last.get_submodule(arch_for(model.config).norm)
    handle = norm.__dict__.pop("_first_token_hook", None)
    if handle is not None:
        handle.remove()
    attn.first_token_only = enabled
    if enabled:
        norm.__dict__["_first_token_hook"] = norm.register_forward_hook(_keep_first_token)
    block = getattr(model.config, COMPRESSION_KEY, None)
    if isinstance(block, dict):
        block["first_token_only"] = enabled
    return model


def _keep_first_token(module, args, output):
    return output[:, :1]  # (B, 1, d): the residual stream after the last attention, first token only


# ---- the classes config.json's auto_map names ------------------------------------------------------------------


def collaborative_config_class(base: type) -> type:
    """``CollaborativeXConfig``: transformers' config class X with model_type ``mhacompress-<x>``."""
    if base.model_type.startswith(REDUCED_TYPE_PREFIX):
        return base
    if base not in _CONFIG_CLASSES:
        _CONFIG_CLASSES[base] = type("Collaborative" + base.__name__, (base,),
                                     {"model_type": REDUCED_TYPE_PREFIX + base.model_type, "__module__": __name__})
    return _CONFIG_CLASSES[base]


def collaborative_model_class(base: type | str) -> type:
    """``CollaborativeX``: transformers' model class X (or its name) whose constructor installs collaborative
    attention from ``config.compression`` and whose ``save_pretrained`` writes a folder that rebuilds it."""
    if isinstance(base, str):
        import transformers

        base = getattr(transformers, base)
    if base.__name__.startswith("Collaborative"):
        return base
    if base not in _MODEL_CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            collaborate_(self, getattr(config, COMPRESSION_KEY))

        def save_pretrained(self, save_directory, *args, **kwargs):
            base.save_pretrained(self, save_directory, *args, **kwargs)
            write_remote_code(Path(save_directory), type(self))

        _MODEL_CLASSES[base] = type("Collaborative" + base.__name__, (base,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__,
            "config_class": collaborative_config_class(base.config_class), "_mhacompress_base": base,
        })
    return _MODEL_CLASSES[base]


def promote_(model: nn.Module) -> nn.Module:
    """Give a model whose attention was just made collaborative the classes of a reduced model (in place): its
    config then serialises as ``mhacompress-<type>`` and ``save_pretrained`` writes a folder that rebuilds it."""
    model.config.__class__ = collaborative_config_class(type(model.config))
    model.__class__ = collaborative_model_class(type(model))
    _register_output_recorders(model)
    return model


def _register_output_recorders(model: nn.Module) -> None:
    """transformers keys the output recorders (``output_attentions``, ``output_hidden_states``) by the model's class,
    registered when a model is constructed: register the new class of a model promoted after construction."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers version: recorders are found by isinstance there
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


def write_remote_code(folder: Path, cls: type) -> None:
    """Copy the modelling files next to the weights and point config.json at them (architectures, auto_map)."""
    here = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(here / name, folder / name)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    base = cls._mhacompress_base.__name__  # e.g. BertForSequenceClassification
    module = REMOTE_CODE_FILES[0].removesuffix(".py")
    auto = {"AutoConfig": f"{module}.{cls.config_class.__name__}",
            "AutoModel": f"{module}.Collaborative{_encoder_name(base)}"}
    if base.endswith("ForSequenceClassification"):
        auto["AutoModelForSequenceClassification"] = f"{module}.Collaborative{base}"
    model_type = config["model_type"].removeprefix(REDUCED_TYPE_PREFIX)
    config.update(model_type=REDUCED_TYPE_PREFIX + model_type, architectures=[f"Collaborative{base}"], auto_map=auto)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _encoder_name(base: str) -> str:
    """The bare encoder class of a model class name: BertForSequenceClassification -> BertModel."""
    return base.removesuffix("ForSequenceClassification") + "Model" if base.endswith("ForSequenceClassification") \
        else base


def __getattr__(name: str):
    """``CollaborativeXConfig`` and ``CollaborativeX`` for any transformers class X, built on first access (the
    names auto_map refers to)."""
    if name.startswith("Collaborative") and name != "CollaborativeSelfAttention":
        import transformers

        base = getattr(transformers, name[len("Collaborative"):], None)
        if isinstance(base, type):
            if name.endswith("Config"):
                return collaborative_config_class(base)
            return collaborative_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
