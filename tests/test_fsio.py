"""fsio: outputs replaced only when complete, with rollback; leftovers of killed runs recognised and cleaned; one
writer per output; umask permissions; signals held back during the renames; data files read with file:line errors."""

import os
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from mhacompress import fsio
from mhacompress.errors import UsageError


def tree(path):
    """{relative path: bytes} of every file under ``path``."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def folder(path, files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- replace ------------------------------------------------------------------------------------------------------

def test_replace_puts_the_new_folder_in_place_and_removes_the_old(tmp_path):
    out = folder(tmp_path / "out", {"old.txt": "old"})
    new = folder(tmp_path / "new", {"a.txt": "new"})
    fsio.replace(new, out)
    assert tree(out) == {"a.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_rename_rolls_back_to_the_old_folder(tmp_path, monkeypatch):
    """The old output must survive a failure of the final rename: not deleted before, put back after."""
    out = folder(tmp_path / "out", {"old.txt": "precious", "sub/x.txt": "also"})
    new = folder(tmp_path / ".out.mhacompress-tmp-1-0000abcd", {"a.txt": "new"})
    before = tree(out)
    real = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    with pytest.raises(OSError, match="No space"):
        fsio.replace(new, out)
    assert tree(out) == before
    assert not any(".mhacompress-old-" in p.name for p in tmp_path.iterdir())


def test_replace_of_a_file_is_atomic_and_keeps_nothing_else(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"old")
    with fsio.temp_file(tmp_path / "m.onnx", ".onnx") as tmp:
        tmp.write_bytes(b"new")
        fsio.replace(tmp, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_temporary_folders_and_files_vanish_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with fsio.temp_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with fsio.atomic_file(tmp_path / "fig.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_file_replaces_a_link_at_its_name_and_never_writes_through_it(tmp_path):
    """A sweep's cell or figure named by a link (planted in its folder) takes the link's place; the file the link
    pointed to is left as it was."""
    (tmp_path / "kept.txt").write_text("precious")
    (tmp_path / "cell.json").symlink_to(tmp_path / "kept.txt")
    with fsio.atomic_file(tmp_path / "cell.json") as tmp:
        tmp.write_text("{}")
    assert not (tmp_path / "cell.json").is_symlink() and (tmp_path / "cell.json").read_text() == "{}"
    assert (tmp_path / "kept.txt").read_text() == "precious"


def test_temporary_names_are_recognisable(tmp_path):
    with fsio.temp_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.mhacompress-tmp-{os.getpid()}-")


# ---- permissions ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_created_folders_and_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with fsio.temp_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            fsio.replace(tmp, tmp_path / "out")
        with fsio.atomic_file(tmp_path / "fig.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "fig.png").stat().st_mode) == 0o666 & ~umask


# ---- leftovers of killed runs --------------------------------------------------------------------------------------

def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    folder(tmp_path / "out", {"a.txt": "current"})
    folder(tmp_path / f".out.mhacompress-tmp-{dead}-0badc0de", {"model.safetensors": "half"})
    (tmp_path / f".out.mhacompress-tmp-{dead}-0badc0df.onnx").write_bytes(b"half")
    folder(tmp_path / f".out.mhacompress-old-{dead}-0badc0e0", {"a.txt": "previous"})
    live = folder(tmp_path / f".out.mhacompress-tmp-{os.getppid()}-0badc0e1", {"x": "a live run's"})
    other = folder(tmp_path / f".other.mhacompress-tmp-{dead}-0badc0e2", {"x": "another output's"})
    fsio.clean_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])
    assert tree(tmp_path / "out") == {"a.txt": b"current"}


def test_an_old_folder_whose_replacement_never_came_is_restored(tmp_path):
    """SIGKILL between moving the old output aside and moving the new one in: the next run puts the old one back."""
    folder(tmp_path / f".out.mhacompress-old-{dead_pid()}-12345678", {"a.txt": "previous"})
    fsio.clean_stale(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and tree(tmp_path / "out") == {"a.txt": b"previous"}


def test_scratch_folders_of_dead_runs_are_removed_and_live_and_other_users_ones_kept(tmp_path, monkeypatch):
    """A run killed outright (SIGKILL, out of memory) leaves its calibration activations in the temporary folder:
    the next run's scratch_dir removes them, never a live run's, another prefix's or another user's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = dead_pid()
    stale = folder(tmp_path / f"mhacompress-calibration-{dead}-k3j2h1", {"x-0.safetensors": "activations"})
    live = folder(tmp_path / f"mhacompress-calibration-{os.getppid()}-a1b2c3", {"x-0.safetensors": "a live run's"})
    other = folder(tmp_path / f"mhacompress-sensitivity-{dead}-d4e5f6", {"x": "another prefix's"})
    unrelated = folder(tmp_path / "mhacompress-calibration-notapid", {"x": "not ours by name"})
    theirs = folder(tmp_path / f"mhacompress-calibration-{dead}-z9y8x7", {"x": "another user's"})
    if os.geteuid() == 0:
        os.chown(theirs, 12345, 12345)
    else:
        theirs = None  # only root can make a folder another user's
    with fsio.scratch_dir("mhacompress-calibration-") as work:
        assert work.name.startswith(f"mhacompress-calibration-{os.getpid()}-") and work.is_dir()
        assert not stale.exists()
        assert all(p.exists() for p in (live, other, unrelated, theirs) if p is not None)
    assert not work.exists()


# ---- the lock --------------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from mhacompress import fsio
from pathlib import Path
fsio.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(30)
"""


def test_a_second_process_cannot_take_a_held_lock(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(fsio.__file__)))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(fsio.OutputBusy) as busy:
            fsio.acquire(out)
        assert busy.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    fsio.acquire(out)  # the holder died: the kernel released its lock, the stale file is reused
    fsio.acquire(out)  # reentrant within a process
    fsio.release(out)
    assert list(tmp_path.iterdir()) == []


def test_another_thread_of_the_process_cannot_take_a_held_lock(tmp_path):
    """Reentrant for the thread that holds it (check_output, then save), not for the process: two threads saving
    one output would interleave their files."""
    import threading

    out, taken, done = tmp_path / "out", threading.Event(), threading.Event()

    def hold():
        fsio.acquire(out)
        taken.set()
        done.wait(10)
        fsio.release(out)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        with pytest.raises(fsio.OutputBusy) as busy:
            fsio.acquire(out)
        assert busy.value.pid == os.getpid()
        from mhacompress.hub import check_output

        with pytest.raises(UsageError, match="being written by another mhacompress run \\(another thread of this"):
            check_output(out)
    finally:
        done.set()
        holder.join()
    fsio.acquire(out)
    fsio.acquire(out)  # reentrant in this thread
    fsio.release(out)
    assert list(tmp_path.iterdir()) == []


def test_release_removes_created_parents_that_stayed_empty(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    fsio.make_parents(out)
    fsio.acquire(out)
    assert (tmp_path / "a" / "b").is_dir()
    fsio.release(out)
    assert list(tmp_path.iterdir()) == []


# ---- signals --------------------------------------------------------------------------------------------------------

def test_signals_wait_for_the_end_of_a_deferred_block():
    reached = []
    with fsio.signals_as_exceptions():
        with pytest.raises(fsio.Terminated):
            with fsio.deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("after the signal")
        with pytest.raises(KeyboardInterrupt):
            with fsio.deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after Ctrl-C")
    assert reached == ["after the signal", "after Ctrl-C"]


def test_sigterm_becomes_an_exception_that_runs_finally_blocks():
    cleaned = []
    with fsio.signals_as_exceptions():
        with pytest.raises(fsio.Terminated) as stopped:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
            finally:
                cleaned.append(True)
    assert cleaned == [True] and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# ---- reading data files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,fragment", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"line one\nline two\n\x00\x01\x02", ":3: binary data"),
    (b"ok\nstill ok\nbad \xff byte\n", ":3: not UTF-8 text (byte 0xff)"),
    ("text".encode("utf-16"), "UTF-16"),
    ("text".encode("utf-32"), "UTF-32"),  # its little-endian mark begins as UTF-16's: was called UTF-16
    (b"\0\0\xfe\xff" + "text".encode("utf-32-be"), "UTF-32"),
])
def test_read_text_names_the_file_line_and_fix(tmp_path, data, fragment):
    path = tmp_path / "data.txt"
    path.write_bytes(data)
    with pytest.raises(UsageError) as err:
        fsio.read_text(path, hint="pass one sentence a line")
    message = str(err.value)
    assert fragment in message and str(path) in message
    assert message.endswith(("pass one sentence a line", "(pass one sentence a line)"))
    assert "\n" not in message


def test_read_text_drops_a_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert fsio.read_text(tmp_path / "a.txt", hint="") == "hello\n"


def test_a_parent_another_run_creates_first_is_used_and_left_to_it(tmp_path, monkeypatch):
    """Two runs into a new folder's children both find it missing; the one whose mkdir came second failed with
    'cannot create the folder ...: File exists' (seen in CI's racing test). It uses the folder, and does not remove it
    as its own."""
    out = tmp_path / "a" / "out"
    real = os.mkdir

    def raced(path, mode=0o777):
        real(path, mode)  # the other run's mkdir, just before ours
        raise FileExistsError(17, "File exists", str(path))

    monkeypatch.setattr(fsio.os, "mkdir", raced)
    assert fsio.make_parents(out) == []
    monkeypatch.setattr(fsio.os, "mkdir", real)
    fsio.acquire(out)
    fsio.release(out)
    assert (tmp_path / "a").is_dir()  # the other run's, still there for it
