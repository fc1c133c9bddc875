"""A source is never modified or deleted; outputs are checked (writable, not a source, not busy) before any work, and
saved with the umask's permissions, leaving nothing beside them."""

import errno
import os
import shutil
import stat

import pytest
from click.testing import CliRunner

import mhacompress
from conftest import tiny_model
from mhacompress import fsio
from mhacompress.cli import main
from mhacompress.errors import UsageError
from mhacompress.hub import check_output, save
from mhacompress.reduction.config import Calibration, ReductionConfig
from mhacompress.reduction.surgery import reduce_


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tiny_bert_dir, tmp_path):
    """A writable copy of the tiny checkpoint, so that a test that failed to protect it harms only the copy."""
    return shutil.copytree(tiny_bert_dir, tmp_path / "src")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def reduced():
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    return model


# ---- the source is never the output -----------------------------------------------------------------------------

@pytest.mark.parametrize("where,how", [
    (lambda src: src, "is the source"),
    (lambda src: src / "sub", "lies inside the source"),
    (lambda src: src / "model.safetensors", "is the source"),  # (a folder output at a file: also its own check)
    (lambda src: src.parent, "contains the source"),
    (lambda src: src / ".." / src.name, "is the source"),
])
def test_check_output_refuses_the_source_in_every_relation(src, where, how):
    output = where(src)
    if output.name == "model.safetensors":
        with pytest.raises(UsageError, match="lies inside the source"):
            check_output(output, force=True, sources=[src], kind="file")
        return
    with pytest.raises(UsageError, match=how):
        check_output(output, force=True, sources=[src])


def test_check_output_sees_through_symlinks(src, tmp_path):
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(UsageError, match="is the source"):
        check_output(tmp_path / "link", force=True, sources=[src])
    with pytest.raises(UsageError, match="is the source"):
        check_output(src, force=True, sources=[tmp_path / "link"])


def test_a_model_loaded_by_a_relative_path_is_not_replaced_from_another_working_folder(src, tmp_path, monkeypatch):
    """transformers keeps the path a model was loaded by (config._name_or_path): relative, it names nothing once a
    notebook has changed folder, so a forced save over an original model folder at a path ending in it is refused;
    over a reduction's own output (config.json with its compression block) it goes on."""
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    model, tokenizer = AutoModel.from_pretrained("src"), AutoTokenizer.from_pretrained("src")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    before = tree(src)
    with pytest.raises(UsageError, match="may be the folder the model was loaded from"):
        mhacompress.compress(model, ReductionConfig(key_dim=8, n_iter_max=3), tokenizer=tokenizer,
                             output=tmp_path / "src", force=True)
    assert tree(src) == before and type(model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    save(reduced(), None, tmp_path / "out" / "src")
    mhacompress.compress(model, ReductionConfig(key_dim=8, n_iter_max=3), tokenizer=tokenizer,
                         output=tmp_path / "out" / "src", force=True)


@pytest.mark.parametrize("args", [
    ["reduce", "{src}", "-k", "8", "-o", "{src}", "--force"],
    ["reduce", "{src}", "-k", "8", "-o", "{parent}", "--force"],
    ["reduce", "{src}", "-k", "8", "-o", "{src}/reduced"],
    ["finetune", "{src}", "--task", "mrpc", "--data-dir", "{glue}", "-o", "{src}", "--force", "--limit", "4"],
    ["export", "{src}", "-o", "{src}/model.safetensors", "--force"],
    ["analyze", "{src}", "--plot", "{src}", "--no-curve"],
    ["sweep", "{src}", "--task", "stsb", "--data-dir", "{glue}", "--plot", "{src}/sweep.png"],
])
def test_every_writing_command_refuses_to_touch_its_source(src, glue_dir, args):
    before = tree(src.parent)
    fill = {"src": src, "parent": src.parent, "glue": glue_dir}
    one_line_error(invoke(*[a.format(**fill) for a in args]), "the source", "choose")
    assert tree(src.parent) == before


@pytest.mark.parametrize("args", [
    ["reduce", "{src}", "-k", "8", "--eval", "stsb", "-o", "{data}", "--force"],
    ["finetune", "{src}", "--task", "stsb", "-o", "{data}/glue", "--force", "--limit", "4"],
    ["sweep", "{src}", "--task", "stsb", "--key-dims", "8", "--limit", "4", "--plot", "{data}/glue/sweep.png"],
])
def test_the_glue_folder_of_the_environment_is_a_source_too(src, glue_dir, tmp_path, monkeypatch, args):
    """$MHACOMPRESS_GLUE_DIR is read like --data-dir, so --force never deletes it (it did: the GLUE data was gone)."""
    data = tmp_path / "data"
    for name in ("train.tsv", "dev.tsv"):
        (data / "glue" / "STS-B").mkdir(parents=True, exist_ok=True)
        lines = (glue_dir / "STS-B" / name).read_text().splitlines(keepends=True)
        (data / "glue" / "STS-B" / name).write_text("".join(lines[:30]))
    monkeypatch.setenv("MHACOMPRESS_GLUE_DIR", str(data / "glue"))
    before = tree(tmp_path)
    one_line_error(invoke(*[a.format(src=src, data=data) for a in args]), "the source", "choose")
    assert tree(tmp_path) == before


def test_a_python_save_never_replaces_the_data_the_reduction_read(src, glue_dir, tmp_path):
    """compress(...).save(..., force=True) protects what compress read, as the CLI does: the GLUE folder of data_dir
    and a calibration file."""
    data = tmp_path / "data" / "glue" / "STS-B"
    data.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("".join((glue_dir / "STS-B" / name).read_text().splitlines(keepends=True)[:30]))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "calib.txt").write_text("a first sentence\nand a second one\n")
    before = tree(tmp_path)
    on_task = mhacompress.compress(str(src), ReductionConfig(key_dim=8, n_iter_max=3, calibration=Calibration(
        "stsb", samples=8)), data_dir=str(tmp_path / "data" / "glue"))
    with pytest.raises(UsageError, match="contains the source"):
        on_task.save(tmp_path / "data", force=True)
    on_file = mhacompress.compress(str(src), ReductionConfig(key_dim=8, n_iter_max=3, calibration=Calibration(
        str(tmp_path / "texts" / "calib.txt"), samples=8)))
    with pytest.raises(UsageError, match="contains the source"):
        on_file.save(tmp_path / "texts", force=True)
    assert tree(tmp_path) == before


def test_save_itself_refuses_the_folder_the_model_was_loaded_from(src):
    """Defence in depth: even a caller that passes no source cannot overwrite the checkpoint it loaded."""
    from mhacompress.hub import load_pretrained

    model, tokenizer, _ = load_pretrained(str(src))
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    before = tree(src)
    with pytest.raises(UsageError, match="is the source"):
        save(model, tokenizer, src, force=True)
    with pytest.raises(UsageError, match="contains the source"):
        save(model, tokenizer, src.parent, force=True)
    assert tree(src) == before


def test_force_never_deletes_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(UsageError, match="current folder"):
        check_output(".", force=True)
    with pytest.raises(UsageError, match="current folder"):
        check_output("..", force=True)


# ---- checked before any work -----------------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading the model: the refusal must come first."""
    def work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("mhacompress.hub.load_pretrained", work)


def test_a_file_in_the_path_fails_before_any_work(src, tmp_path, no_work):
    (tmp_path / "a-file").write_text("x")
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / "a-file" / "out"), "a-file is a file")


def test_a_too_long_name_fails_with_its_length(src, tmp_path, no_work):
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / ("x" * 300)), "300 bytes", "shorter")
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / ("x" * 240)), "too long", "temporary name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_empty_output_is_refused_not_a_silent_dry_run(src, no_work):
    one_line_error(invoke("reduce", src, "-k", "8", "-o", ""), "--output is empty")


def test_an_unwritable_parent_fails_before_any_work(src, tmp_path, monkeypatch, no_work):
    """Read-only file systems and permissions (root ignores mode bits, so the refusal is simulated)."""
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "mkdir", read_only)
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / "ro" / "out"), "cannot write in",
                   "Read-only file system")
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / "ro" / "new" / "out"), "cannot create the folder")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_fails_before_any_work(src, tmp_path, no_work):
    (tmp_path / "ro").mkdir(mode=0o555)
    one_line_error(invoke("reduce", src, "-k", "8", "-o", tmp_path / "ro" / "out"), "Permission denied")


def test_a_run_that_fails_removes_the_parents_it_created(src, tmp_path):
    one_line_error(invoke("reduce", src, "-k", "33", "-o", tmp_path / "a" / "b" / "out"), "out of range",
                   exit_code=2)  # a bad setting
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_output_being_written_by_another_run_is_refused(src, tmp_path):
    import fcntl

    out = tmp_path / "out"
    holder = os.open(fsio.lock_path(out), os.O_RDWR | os.O_CREAT)  # its own open file: a lock like another process's
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"4242\n")
    try:
        one_line_error(invoke("reduce", src, "-k", "8", "-o", out), "being written by another mhacompress run",
                       "4242", "wait")
    finally:
        os.close(holder)
    assert not out.exists()


# ---- what a save leaves ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_saved_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save(reduced(), None, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_force_over_a_symlinked_output_replaces_its_target_and_leaves_nothing(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text('{"model_type": "bert"}')  # a model saved before
    (tmp_path / "v1" / "old.txt").write_text("old")
    (tmp_path / "latest").symlink_to(tmp_path / "v1")
    save(reduced(), None, tmp_path / "latest", force=True)
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "latest" / "model.safetensors").is_file()
    assert not (tmp_path / "v1" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_file_output_that_is_a_link_or_a_dangling_link_is_refused_and_nothing_is_written_through_it(tmp_path, kind):
    """`export -o link.onnx --force`, with the link pointing at a dataset file, replaced the dataset with the ONNX
    graph; a dangling link made a file at its target without --force."""
    (tmp_path / "data.tsv").write_text("precious")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "data.tsv")
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")
    if kind == "file":
        with pytest.raises(UsageError, match=r"link\.onnx is a symbolic link \(to .*data\.tsv\); nothing is written"):
            check_output(tmp_path / "link.onnx", force=True, kind="file")
    with pytest.raises(UsageError, match="is a dangling symbolic link"):
        check_output(tmp_path / "dangling", force=True, kind=kind)
    assert (tmp_path / "data.tsv").read_text() == "precious" and not os.path.lexists(tmp_path / "elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "data.tsv", "link.onnx"]  # no lock left


def test_export_through_a_linked_file_is_refused_in_one_line(tiny_reduced_dir, tmp_path):
    (tmp_path / "data.tsv").write_text("precious")
    (tmp_path / "model.onnx").symlink_to(tmp_path / "data.tsv")
    one_line_error(invoke("export", tiny_reduced_dir, "-o", tmp_path / "model.onnx", "--force"), "symbolic link")
    assert (tmp_path / "data.tsv").read_text() == "precious"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_dash_is_not_taken_for_a_name(tmp_path, monkeypatch, kind):
    """`-o -` (standard output, in most tools) made a folder named '-'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="named '-' .*does not mean standard output"):
        check_output("-", kind=kind)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_planted_as_a_link_is_never_opened_through(tmp_path):
    """The lock was opened with O_CREAT and truncated: a link planted at its name (in a shared /tmp, by anyone)
    emptied the file it pointed to, without --force."""
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / ".out.mhacompress-lock").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(UsageError, match="mhacompress-lock is a symbolic link.*remove it"):
        check_output(tmp_path / "out")
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mhacompress-lock", "victim.txt"]


def test_an_output_where_a_source_folders_links_point_is_refused(src, tmp_path):
    """A folder of links to another copy (a hub cache snapshot links into its blobs) is read from where the links
    point: `reduce LINKS -o THERE --force` replaced the weights the source still reads."""
    copy = shutil.copytree(src, tmp_path / "copy")
    links = tmp_path / "links"
    links.mkdir()
    for f in copy.iterdir():
        (links / f.name).symlink_to(f)
    before = tree(copy)
    for output, how in [(copy, "contains the source"), (copy / "model.safetensors", "is the source")]:
        with pytest.raises(UsageError, match=how):
            check_output(output, force=True, sources=[links], kind="folder" if output.is_dir() else "file")
    one_line_error(invoke("reduce", links, "-k", "8", "--iterations", "3", "-o", copy, "--force"), "the source")
    assert tree(copy) == before


def test_a_forced_save_removes_stale_leftovers_of_killed_runs(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / f".out.mhacompress-tmp-{proc.pid}-deadbeef").mkdir()
    (tmp_path / f".out.mhacompress-tmp-{proc.pid}-deadbeef" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.mhacompress-lock").write_text(f"{proc.pid}\n")
    save(reduced(), None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_never_writes_into_the_original_a_reduced_folder_was_made_from(src, tmp_path):
    pytest.importorskip("onnxscript")
    invoke("reduce", src, "-k", "8", "--iterations", "3", "-o", tmp_path / "reduced")
    before = tree(src)
    one_line_error(invoke("export", tmp_path / "reduced", "-o", src / "model.onnx"), "lies inside the source")
    assert tree(src) == before


def test_finetune_never_replaces_the_original_a_reduced_folder_was_made_from(src, glue_dir, tmp_path):
    """Fine-tuning a reduced folder with --force onto its recorded original replaced it: `report` of the reduced
    folder then compared it with the fine-tuned copy of itself as 'the original', without a word."""
    invoke("reduce", src, "-k", "8", "--iterations", "3", "-o", tmp_path / "reduced")
    before = tree(src)
    one_line_error(invoke("finetune", tmp_path / "reduced", "-t", "stsb", "--data-dir", glue_dir, "-o", src,
                          "--force", "--limit", "4"), "is the source", "choose")
    assert tree(src) == before


def test_export_refuses_a_negative_or_nan_tolerance_before_exporting(tmp_path):
    """A value out of range is a bad command line, exit 2 as docs/usage.md says (these exited 1), and nothing is
    written; an opset newer than the exporter's likewise."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    save(reduced(), None, tmp_path / "m")
    for tolerance in ("-1", "nan"):
        one_line_error(invoke("export", tmp_path / "m", "-o", tmp_path / "m.onnx", "--tolerance", tolerance),
                       "--tolerance must be a finite non-negative number", exit_code=2)
    one_line_error(invoke("export", tmp_path / "m", "-o", tmp_path / "m.onnx", "--opset", "99"),
                   "--opset 99 is newer than the installed exporter", exit_code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("name,magic", [("sweep.png", b"\x89PNG"), ("sweep.pdf", b"%PDF"), ("sweep", b"\x89PNG")])
def test_sweep_figures_are_written_whole_in_the_format_of_their_name(tmp_path, name, magic):
    pytest.importorskip("matplotlib")
    from mhacompress.sweep import plot

    rows = [{"method": "cp", "key_dim": k, "score": 0.8 - 0.1 / k, "qk_params": 100 * k} for k in (8, 16)]
    plot({"results": rows, "original": {"score": 0.8, "qk_params": 3200}, "task": "stsb", "metric": "spearman",
          "examples": 10}, tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_an_output_a_killed_run_had_moved_aside_is_put_back_and_not_replaced_without_force(tmp_path):
    """A --force run killed between its two renames leaves the previous output as .out.mhacompress-old-*; the next
    run puts it back. Without --force that run must then refuse it, not replace it after having found no output."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    previous = tmp_path / f".out.mhacompress-old-{proc.pid}-0123abcd"
    save(reduced(), None, previous)
    before = tree(previous)
    with pytest.raises(UsageError, match="exists and is not empty"):
        save(reduced(), None, tmp_path / "out")
    assert tree(tmp_path / "out") == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_finished_by_another_run_just_before_the_lock_is_not_replaced_without_force(tmp_path, monkeypatch):
    """Another run can finish writing the output between this run's look at it and this run taking the lock."""
    out, acquire = tmp_path / "out", fsio.acquire

    def finished_meanwhile(target):
        monkeypatch.setattr(fsio, "acquire", acquire)
        save(reduced(), None, out)  # the other run, done and gone
        acquire(target)

    monkeypatch.setattr(fsio, "acquire", finished_meanwhile)
    with pytest.raises(UsageError, match="exists and is not empty"):
        check_output(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "model.safetensors").is_file()


def test_a_lock_that_cannot_be_written_on_a_full_disk_is_given_back_and_leaves_no_file(tmp_path, monkeypatch):
    """The lock file is made, but the pid cannot be written into it: the refusal must not keep the lock (a Python
    session could then never write this output again) nor leave the file."""
    real, mine = os.write, f"{os.getpid()}\n".encode()

    def full(fd, data):
        if data == mine:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UsageError, match="No space left on device"):
        check_output(tmp_path / "out")
    monkeypatch.setattr(os, "write", real)
    assert list(tmp_path.iterdir()) == []
    save(reduced(), None, tmp_path / "out")  # once there is room again
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_full_disk_during_the_weights_write_is_one_line_and_keeps_the_previous_output(src, tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError, not an OSError: the CLI printed a traceback."""
    import safetensors
    import transformers.modeling_utils

    out = tmp_path / "out"
    save(reduced(), None, out)
    before = tree(out)

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    one_line_error(invoke("reduce", src, "-k", "8", "--iterations", "3", "-o", out, "--force"),
                   f"{out}: No space left on device", "nothing was replaced")
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("where", ["probe", "flock", "clean_stale"])
def test_ctrl_c_while_an_output_is_checked_leaves_nothing_and_no_lock_in_a_python_session(tmp_path, monkeypatch,
                                                                                         where):
    """A Python session goes on after Ctrl-C: a lock it kept would turn every other run away from the output until
    the session ends ('being written by another mhacompress run'), and a probe folder of a live pid is never
    cleaned."""
    import fcntl
    import signal

    def interrupted_after(module, name, only=lambda *a: True):
        real = getattr(module, name)

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            if only(*args):
                signal.raise_signal(signal.SIGINT)
            return result

        monkeypatch.setattr(module, name, call)

    if where == "probe":
        interrupted_after(os, "mkdir", lambda path, *a: str(path).endswith(".onnx"))
    elif where == "flock":
        interrupted_after(fcntl, "flock")
    else:
        interrupted_after(fsio, "clean_stale")
    with pytest.raises(KeyboardInterrupt):
        check_output(tmp_path / "new" / "out")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [] and not fsio._HELD


def test_a_second_signal_while_a_stopped_run_cleans_up_changes_nothing(src, tmp_path, monkeypatch):
    """Ctrl-C twice (or Ctrl-C, then the SIGTERM of a CI timeout): the second one landed in the cleanup after the
    one-line report, printed a traceback over it and left the lock and the folders made for the output."""
    import signal

    import mhacompress.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = fsio.release_all

    def again():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**5):  # the handler runs between bytecodes
            pass
        real()

    monkeypatch.setattr(mhacompress.pipeline, "compress", interrupted)
    monkeypatch.setattr(fsio, "release_all", again)
    result = invoke("reduce", src, "-k", "8", "-o", tmp_path / "new" / "out")
    assert result.exit_code == 130 and result.output.strip().startswith("stopped by SIGINT"), result.output
    assert len(result.output.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "folder-of-an-earlier-run"])
def test_analyze_figures_stopped_midway_leave_no_partial_folder_and_no_mix_of_runs(tiny_bert_dir, tmp_path,
                                                                                   monkeypatch, existing):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figs = tmp_path / "figs"
    if existing:  # another model's figures, so that a mix of the two runs shows
        tiny_model("bert", seed=1).save_pretrained(tmp_path / "other")
        mhacompress.analyze(str(tmp_path / "other"), key_dims=[4], plot=figs)
    before = tree(figs) if existing else None
    real, calls = Figure.savefig, []

    def stopped_at_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        mhacompress.analyze(str(tiny_bert_dir), key_dims=[4], plot=figs, force=existing)
    if existing:
        assert tree(figs) == before
    else:
        assert not figs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["figs", "other"] if existing else [])


def test_leftovers_of_a_killed_run_whose_pid_this_run_reuses_are_removed(tmp_path, monkeypatch):
    """In a container every run can be pid 1 (or the same small pid): a leftover named with this process's own pid
    but older than this process is a killed run's, not this one's, and was kept for good (GBs of hidden weights)."""
    import time

    leftover = tmp_path / f".out.mhacompress-tmp-{os.getpid()}-0badc0de"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(fsio, "STARTED", time.time() + 60)  # this process started after the leftover was made
    save(reduced(), None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_name_that_is_not_utf8_is_refused_before_any_work(src, tmp_path):
    """A byte 0xff in the name (surrogate-escaped by Python): the tokenizer and safetensors writers cannot take the
    path, so the run failed with a traceback after all its work."""
    out = tmp_path / "bad\udcffname"
    with pytest.raises(UsageError, match="not valid UTF-8"):
        check_output(out)
    one_line_error(invoke("reduce", src, "-k", "8", "--iterations", "3", "-o", out), "not valid UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
