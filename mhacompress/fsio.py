"""Writing outputs safely: nothing half-written, nothing left behind, the previous output kept until the new one is
complete, and one writer per output at a time.

- Work happens in a temporary sibling named ``.NAME.mhacompress-tmp-<pid>-<hex>``; the output it replaces is moved
  aside to ``.NAME.mhacompress-old-<pid>-<hex>`` and deleted only once the new one is in place (put back if that
  fails). Leftovers of a killed run are recognisable by these names and removed by the next run into the same place
  once their pid is dead, or is this process's own and they are older than it (an old folder whose replacement never
  arrived is put back instead).
- A run's working files (calibration activations) go to ``scratch_dir``, a folder ``PREFIX<pid>-...`` in the system's
  temporary folder, removed on the way out; what a run killed outright left there is removed by the next run once its
  pid is dead (this user's folders only).
- ``.NAME.mhacompress-lock`` beside the output holds an exclusive ``flock`` for the whole run: a second run into the
  same output fails at once instead of mixing files.
- ``signals_as_exceptions`` turns SIGTERM (and SIGHUP) into a ``Terminated`` exception in the main thread, so that a
  terminated run unwinds through ``finally`` blocks like an interrupted one; ``deferred_signals`` holds both back
  during the few renames that must not be split.

Everything is created with the process umask, like any ordinary tool. Library code: raises, never prints.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: runs there go unlocked
    fcntl = None

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows
TMP, OLD, LOCK = "mhacompress-tmp", "mhacompress-old", "mhacompress-lock"
LONGEST_SUFFIX = len(f".{TMP}-{2**22}-{'0' * 8}.onnx") + 1  # what temporary names add to an output's name
WRITTEN: list[str] = []  # outputs completed by this process (for the one-line report of an interrupted run)
STARTED = time.time()  # before this process wrote anything: a leftover with its pid but older is a killed run's

_HELD: dict[Path, int] = {}  # output -> open descriptor holding the flock of its lock file
_OWNER: dict[Path, int] = {}  # output -> the thread that holds its lock (reentrant for that thread only)
_CREATED: dict[Path, list[Path]] = {}  # output -> parent folders created for it (removed again if still empty)


class Terminated(BaseException):
    """A termination signal (SIGTERM, SIGHUP), raised in the main thread so that cleanup code runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class OutputBusy(Exception):
    """Another live process holds the lock of this output."""

    def __init__(self, target: Path, pid: int | None):
        super().__init__(f"{target} is being written by process {pid}")
        self.target, self.pid = target, pid


# ---- names ------------------------------------------------------------------------------------------------------

def sibling(target: Path, tag: str, suffix: str = "") -> Path:
    """A fresh, recognisable name beside ``target``: ``.NAME.TAG-<pid>-<hex>SUFFIX``."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{LOCK}")


def _leftover_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.mhacompress-(tmp|old)-(\d+)-[0-9a-f]{{8}}(\.\w+)?")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file, a link or a folder tree (never what a link points to); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(target: Path) -> list[Path]:
    """Remove what killed runs into ``target`` left beside it (their pid is dead); an old output that was moved aside
    and never replaced is put back first. Returns the paths handled."""
    handled = []
    for entry, match in _left_by_gone_runs(target.parent, _leftover_pattern(target), 2):
        try:
            if match.group(1) == "old" and not os.path.lexists(target):
                os.rename(entry, target)  # the previous output, restored
            else:
                remove(entry)
        except OSError:  # best effort: a leftover we cannot touch is not this run's problem
            continue
        handled.append(entry)
    return handled


def _left_by_gone_runs(folder: Path, pattern: re.Pattern, pid_group: int) -> Iterator[tuple[Path, re.Match]]:
    """The entries of ``folder`` whose names ``pattern`` matches, with the match, where the run named by the pid in
    group ``pid_group`` is gone: its pid is dead, or is this process's own and the entry is older than it."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not (pid_alive(int(match.group(pid_group)))
                          and not _before_this_process(entry, int(match.group(pid_group)))):
            yield entry, match


def _before_this_process(entry: Path, pid: int) -> bool:
    """A leftover named with this process's own pid, made before it started: a killed run's whose pid was reused (in
    a container every run can be pid 1)."""
    try:
        return pid == os.getpid() and os.lstat(entry).st_ctime < STARTED
    except OSError:
        return False


# ---- creating and replacing ---------------------------------------------------------------------------------------

def make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target`` (umask permissions); remembered so that a run that ends without
    writing removes them again. A folder another run creates first (both found it missing) is used and left to it.
    Raises OSError."""
    missing, theirs = [], set()  # missing: the deepest first
    parent = target.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            if not folder.is_dir():
                raise
            theirs.add(folder)
    made = [folder for folder in missing if folder not in theirs]
    _CREATED.setdefault(target, []).extend(made)
    return made


def probe(target: Path) -> None:
    """Create and remove a temporary folder beside ``target``: the real test of writability (read-only file
    systems, permissions, ACLs, name length), done before any work. Raises OSError."""
    path = sibling(target, TMP, ".onnx")
    with deferred_signals():  # Ctrl-C in between would leave the folder, under a live pid in a Python session
        os.mkdir(path, 0o777)
        os.rmdir(path)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (another thread may create files meanwhile)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give everything under ``root`` (and itself) the permissions a plain ``open``/``mkdir`` would: libraries that
    write through private temporary files (transformers' safetensors writer does) leave 0600 behind."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def temp_dir(target: Path):
    """A new empty folder beside ``target`` (umask permissions), removed on the way out unless it was moved into
    place meanwhile."""
    path = sibling(target, TMP)
    os.mkdir(path, 0o777)
    return _removed_unless_moved(path)


def temp_file(target: Path, suffix: str = ""):
    """A new empty file beside ``target`` (umask permissions), removed on the way out unless moved into place."""
    path = sibling(target, TMP, suffix)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return _removed_unless_moved(path)


def scratch_dir(prefix: str):
    """A new private folder for a run's working files in the system's temporary folder, removed on the way out even
    when Ctrl-C comes again during the removal (tempfile.TemporaryDirectory left it then). Named ``PREFIX<pid>-...``,
    so that what a run killed outright (SIGKILL, the out-of-memory killer) left, gigabytes of activations for a large
    model, is removed by the next run's ``clean_scratch``."""
    clean_scratch(prefix)
    return _removed_unless_moved(Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")))


def clean_scratch(prefix: str) -> list[Path]:
    """Remove this user's ``scratch_dir`` folders of ``prefix`` in the system's temporary folder whose run is gone
    (its pid is dead, or is this process's own and the folder is older than it). Returns the folders removed."""
    pattern, handled = re.compile(rf"{re.escape(prefix)}(\d+)-[^/\\]+"), []
    uid = getattr(os, "getuid", lambda: None)()
    for entry, _ in _left_by_gone_runs(Path(tempfile.gettempdir()), pattern, 1):
        try:
            info = os.lstat(entry)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):  # another user's: theirs
            continue
        remove(entry)
        handled.append(entry)
    return handled


@contextlib.contextmanager
def _removed_unless_moved(path: Path):
    try:
        yield path
    finally:
        if os.path.lexists(path):
            with deferred_signals():
                remove(path)


def replace(tmp: Path, target: Path) -> None:
    """Put ``tmp`` (a file or a folder) in ``target``'s place. A file replaces atomically. An existing folder is
    moved aside first, deleted only after ``tmp`` is in place, and moved back if that rename fails. Signals wait
    until the renames are done."""
    with deferred_signals():
        if tmp.is_file() or not os.path.lexists(target):
            os.replace(tmp, target)
            WRITTEN.append(str(target))
            return
        old = sibling(target, OLD)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        WRITTEN.append(str(target))
        remove(old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str | None = None):
    """``with atomic_file(path) as tmp: write(tmp)``: ``path`` appears, complete, only when the block succeeds (for
    figures and other single files; ``suffix`` defaults to the path's, so writers that read it still see it)."""
    path = Path(path).expanduser()
    target = path.parent.resolve() / path.name  # a link at the name itself is replaced, never written through
    with temp_file(target, target.suffix if suffix is None else suffix) as tmp:
        yield tmp
        replace(tmp, target)


# ---- the output lock ----------------------------------------------------------------------------------------------

def acquire(target: Path) -> None:
    """Hold the exclusive lock of ``target`` until ``release`` (or exit); reentrant within the thread that holds it.
    Raises OutputBusy when another live process, or another thread of this one, holds it, OSError when the lock file
    cannot be made."""
    if fcntl is None:
        return
    if target in _HELD:
        if _OWNER.get(target) != threading.get_ident():  # two threads saving one output would interleave their files
            raise OutputBusy(target, os.getpid())
        return
    path = lock_path(target)
    with deferred_signals():  # Ctrl-C between the flock and _HELD would keep the lock out of release's reach
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)  # a planted link: ELOOP, never followed
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise OutputBusy(target, holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its last holder deleted the file between our open and our flock: lock the new one
        _HELD[target], _OWNER[target] = fd, threading.get_ident()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:  # a full disk: give the lock back (file and flock), or this process keeps it for good
        release(target)
        raise


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def release(target: Path) -> None:
    """Give up ``target``'s lock: the lock file is deleted (while still locked), then closed; folders created for the
    output and still empty are removed."""
    fd = _HELD.pop(target, None)
    _OWNER.pop(target, None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(target))
        os.close(fd)
    for folder in _CREATED.pop(target, []):  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def release_all() -> None:
    for target in {*_HELD, *_CREATED}:
        release(target)


atexit.register(release_all)


# ---- signals ------------------------------------------------------------------------------------------------------

_depth = 0  # nesting of deferred_signals in the main thread
CAUGHT = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT, SIGTERM and SIGHUP back for the duration of the block, then deliver the first that came to the
    handler that was in place (which raises, or ends the process). A no-op outside the main thread, where Python
    never runs signal handlers anyway."""
    global _depth
    if not _main_thread():
        yield
        return
    if _depth:  # nested: the outermost block delivers
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in CAUGHT}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: installed from C, leave it alone
    for s in previous:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def _terminate(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_exceptions():
    """For a command-line run: SIGTERM and SIGHUP raise ``Terminated``, SIGINT ``KeyboardInterrupt``, so that every
    ``finally`` block (temporary folders, locks) runs before the process ends. A signal the process was started
    ignoring (``nohup``, a script's background job) stays ignored. Main thread only."""
    if not _main_thread():
        yield
        return
    wanted = {s: _terminate for s in CAUGHT if s != signal.SIGINT}
    wanted[signal.SIGINT] = signal.default_int_handler
    wanted = {s: h for s, h in wanted.items() if signal.getsignal(s) != signal.SIG_IGN}
    previous = {s: signal.signal(s, h) for s, h in wanted.items()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---- reading text data --------------------------------------------------------------------------------------------

def read_text(path: Path, *, hint: str) -> str:
    """The UTF-8 text of a data file (a BOM is dropped). Empty, binary, UTF-16 or undecodable files are a
    UsageError that names ``path:line`` and ends with ``hint`` (what the file should be)."""
    from .errors import UsageError

    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}; {hint}") from None
    if not data.strip():
        raise UsageError(f"{path} is empty; {hint}")
    if data.startswith((b"\xff\xfe\0\0", b"\0\0\xfe\xff")):  # before UTF-16: the LE marks begin alike
        raise UsageError(f"{path} is UTF-32 text; save it as UTF-8 ({hint})")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path} is UTF-16 text; save it as UTF-8 ({hint})")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UsageError(f"{path}:{_line_of(data, nul)}: binary data (a NUL byte), not text; {hint}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}:{_line_of(data, err.start)}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it "
                         f"as UTF-8 ({hint})") from None


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1
