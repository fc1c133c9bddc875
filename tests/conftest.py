"""Shared fixtures: tiny random models of every supported architecture, the bundled MiniLM, the GLUE folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tiny configs, one per supported model_type: 2 layers, 4 heads of 8 (hidden 32).
TINY = {
    "bert": ("BertConfig", {}),
    "roberta": ("RobertaConfig", {"pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", {"pad_token_id": 1}),
    "electra": ("ElectraConfig", {"embedding_size": 32}),
    "camembert": ("CamembertConfig", {"pad_token_id": 1}),
    "data2vec-text": ("Data2VecTextConfig", {"pad_token_id": 1}),
    "ernie": ("ErnieConfig", {"pad_token_id": 0}),
    "mpnet": ("MPNetConfig", {"pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64}),
}


def tiny_config(model_type: str, **overrides):
    import transformers

    cls_name, extra = TINY[model_type]
    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=3, initializer_range=0.3)  # peaked attention
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(model_type: str, head: bool = False, attn: str = "eager", seed: int = 0):
    """A random tiny model with non-trivial biases (so the content-bias path is exercised), in eval mode."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    cls = AutoModelForSequenceClassification if head else AutoModel
    if attn == "sdpa" and not cls._model_mapping[type(config)]._supports_sdpa:
        pytest.skip(f"transformers has no sdpa implementation of {model_type}")
    model = cls.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def padded_batch(vocab_size: int = 100, lengths=(9, 4, 7, 1), seed: int = 0):
    """input_ids and attention_mask of mixed lengths, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), T), generator=gen)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def final_error(model, original, batches) -> float:
    """Relative error of the last hidden states on real tokens, reduced against original."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            keep = b["attention_mask"].bool()
            a, o = model(**b).last_hidden_state[keep], original(**b).last_hidden_state[keep]
            num, den = num + float((a - o).pow(2).sum()), den + float(o.pow(2).sum())
    return (num / den) ** 0.5


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = Path(os.environ.get("MHACOMPRESS_GLUE_DIR", REPO.parent / "shared" / "glue"))
    if not path.is_dir():
        message = f"GLUE data not found at {path}; set MHACOMPRESS_GLUE_DIR"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from mhacompress.hub import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A tiny random BERT with the bundled tokenizer, saved as a local checkpoint (read-only for tests)."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    path = tmp_path_factory.mktemp("tiny") / "bert"
    BertModel(tiny_config("bert", vocab_size=tokenizer.vocab_size)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reduced_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """``tiny_bert_dir`` reduced to key dim 8 (a few ALS sweeps) and saved: a reduced folder for tests that only read
    it (its compression block names tiny_bert_dir as the source)."""
    from mhacompress import compress
    from mhacompress.reduction.config import ReductionConfig

    path = tmp_path_factory.mktemp("tiny-reduced") / "bert-cp8"
    compress(str(tiny_bert_dir), ReductionConfig(key_dim=8, n_iter_max=3)).save(path)
    return path
