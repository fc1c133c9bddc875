"""The architecture table: where self-attention lives in each supported ``model_type``, as data.

Shipped in every reduced model folder (with attention.py, kernels.py and modeling_mhacompress.py): torch, transformers
and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

COMPRESSION_KEY = "compression"  # the block in config.json that describes a reduction
FORMAT_VERSION = 2  # 1: model_type of the original; 2: model_type "mhacompress-<original>", typed reduction config
REDUCED_TYPE_PREFIX = "mhacompress-"  # a reduced model's config.json says e.g. "mhacompress-bert": plain
# transformers then refuses it instead of loading an unreduced model with random query/key weights


@dataclass(frozen=True)
class Arch:
    """Where self-attention lives in one architecture. Paths are relative to one transformer layer, except
    ``layers`` (relative to ``model.base_model``)."""

    layers: str  # the ModuleList of transformer layers
    attention: str  # the self-attention module that is replaced
    query: str  # its query, key and value projections
    key: str
    value: str
    output: str | None  # output projection, when it lives inside the self-attention module
    out_proj: str  # the attention output projection W_O (its input is the heads' context)
    norm: str  # the LayerNorm after attention: its input is the residual sum x + W_O ctx + b
    heads: str  # config attribute: number of heads
    hidden: str  # config attribute: hidden size
    dropout: str  # config attribute: attention-probability dropout
    returns: str  # "pair": (output, weights) as transformers v5 modules; "mpnet": (output,) or (output, probs)


_BERT_LIKE = Arch(
    layers="encoder.layer", attention="attention.self", query="query", key="key", value="value", output=None,
    out_proj="attention.output.dense", norm="attention.output.LayerNorm", heads="num_attention_heads",
    hidden="hidden_size", dropout="attention_probs_dropout_prob", returns="pair",
)

ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "data2vec-text": _BERT_LIKE,
    "ernie": _BERT_LIKE,
    "mpnet": Arch(
        layers="encoder.layer", attention="attention.attn", query="q", key="k", value="v", output="o",
        out_proj="attention.attn.o", norm="attention.LayerNorm", heads="num_attention_heads", hidden="hidden_size",
        dropout="attention_probs_dropout_prob", returns="mpnet",
    ),
    "distilbert": Arch(
        layers="transformer.layer", attention="attention", query="q_lin", key="k_lin", value="v_lin",
        output="out_lin", out_proj="attention.out_lin", norm="sa_layer_norm", heads="n_heads", hidden="dim",
        dropout="attention_dropout", returns="pair",
    ),
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not in ARCHITECTURES."""


def base_model_type(config) -> str | None:
    """The ``model_type`` of the original architecture (a reduced config says ``mhacompress-<type>``)."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith(REDUCED_TYPE_PREFIX):
        return model_type[len(REDUCED_TYPE_PREFIX):]
    return model_type


def arch_for(config) -> Arch:
    """The table entry for ``config.model_type``; an unknown type is an error naming the supported ones."""
    model_type = base_model_type(config)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{model_type} configured as a decoder is not supported; only encoders are")
    return ARCHITECTURES[model_type]


def is_classifier(model: nn.Module) -> bool:
    """A sequence-classification head (original, or reduced: CollaborativeBertForSequenceClassification): it reads
    only the first token of the last layer."""
    return type(model).__name__.endswith("ForSequenceClassification")


def max_tokens(model) -> int | None:
    """The longest sequence the model's learned position embeddings can take (None: it has none). BERT-style
    embeddings use every position; RoBERTa-style ones (a ``padding_idx``: RoBERTa, XLM-R, CamemBERT, data2vec-text,
    MPNet) number positions from padding_idx + 1. The one rule for eval, finetune, calibration and report."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not hasattr(table, "num_embeddings"):
        return None
    offset = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (offset + 1 if isinstance(offset, int) else 0)


def layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a supported model, in order."""
    return model.base_model.get_submodule(arch_for(model.config).layers)


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, self_attention)`` for every layer, in order."""
    arch = arch_for(model.config)
    parent_path, _, name = arch.attention.rpartition(".")
    found = []
    for layer in layers(model):
        parent = layer.get_submodule(parent_path) if parent_path else layer
        found.append((parent, name, getattr(parent, name)))
    return found
