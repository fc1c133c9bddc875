"""Real `mhacompress reduce` processes stopped mid-save (SIGTERM, Ctrl-C, SIGKILL) and racing into one output: the
previous output stays intact, nothing is left beside it, and two writers never mix. The save is slowed down by a
patch inside the child process, so each case takes seconds."""

import os
import signal
import subprocess
import sys
import time

import pytest

import mhacompress
from conftest import REPO, tiny_model
from mhacompress.hub import save
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_

CHILD = r"""
import os, pathlib, sys, time
import transformers
import mhacompress.hub as hub

ready, barrier, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
real_save, real_check = transformers.PreTrainedModel.save_pretrained, hub.check_output


def check_output(*a, **k):  # tell the other racer that this run has passed (or failed) its output check
    try:
        return real_check(*a, **k)
    finally:
        if barrier != "-":
            pathlib.Path(barrier, str(os.getpid())).touch()


def slow_save(self, path, *a, **k):  # the weights are in the temporary folder: now linger there
    real_save(self, path, *a, **k)
    pathlib.Path(path, "partial.bin").write_bytes(b"x" * 4096)
    ready.write_text(str(path))
    deadline = time.time() + 60
    while time.time() < deadline and (barrier == "-" or len(os.listdir(barrier)) < 2):
        time.sleep(0.05)


hub.check_output = check_output
transformers.PreTrainedModel.save_pretrained = slow_save
from mhacompress.cli import main

main(args, prog_name="mhacompress")
"""


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def child(tmp_path, tiny_dir, out, *extra, barrier="-", tag="a", ignored=()):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ready = tmp_path / f"ready-{tag}"
    args = ["reduce", tiny_dir, "-k", "8", "--iterations", "3", "-o", out, "--json", *extra]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(barrier), *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN) for s in ignored])  # as nohup does
    return proc, ready


def wait_until_saving(proc, ready, timeout=90):
    deadline = time.time() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached the save: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


def previous_output(path, tiny_dir):
    from transformers import AutoTokenizer

    model = tiny_model("bert", seed=1)
    reduce_(model, ReductionConfig(key_dim=4, n_iter_max=3))
    save(model, AutoTokenizer.from_pretrained(tiny_dir), path)
    return tree(path)


@pytest.mark.parametrize("signum,existing", [(signal.SIGTERM, True), (signal.SIGINT, False)],
                         ids=["sigterm-over-existing", "ctrl-c-into-new-folders"])
def test_a_run_stopped_mid_save_leaves_nothing_and_keeps_the_previous_output(tmp_path, tiny_bert_dir, signum,
                                                                               existing):
    outs = tmp_path / "outs"
    if existing:
        out = outs / "out"
        before = previous_output(out, tiny_bert_dir)
    else:
        out = outs / "new" / "deeper" / "out"  # parents the run creates, and must remove again
    proc, ready = child(tmp_path, tiny_bert_dir, out, *(["--force"] if existing else []))
    wait_until_saving(proc, ready)
    assert any(".mhacompress-tmp-" in p.name for p in out.parent.iterdir())  # caught mid-save
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signal.Signals(signum).name}"), stderr
    assert "nothing was written" in lines[0] and stdout == ""
    if existing:
        assert [p.name for p in outs.iterdir()] == ["out"] and tree(out) == before
    else:
        assert not outs.exists()


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path, tiny_bert_dir):
    out = tmp_path / "outs" / "out"
    before = previous_output(out, tiny_bert_dir)
    proc, ready = child(tmp_path, tiny_bert_dir, out, "--force")
    wait_until_saving(proc, ready)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait()
    names = sorted(p.name for p in out.parent.iterdir())
    assert names[0] == ".out.mhacompress-lock" and names[1].startswith(".out.mhacompress-tmp-") and names[2] == "out"
    assert tree(out) == before
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    save(model, None, out, force=True)
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_two_runs_racing_into_one_output_give_one_folder_and_one_clear_error(tmp_path, tiny_bert_dir):
    """Both runs check the output before either saves (a barrier in the children makes sure): one must be turned
    away, the other must write a complete folder."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = tmp_path / "outs" / "out"
    runs = [child(tmp_path, tiny_bert_dir, out, barrier=barrier, tag=tag)[0] for tag in "ab"]
    outputs = [p.communicate(timeout=120) for p in runs]
    results = [(p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(runs, outputs)]
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    (_, _, error), = [r for r in results if r[0] == 1]
    lines = error.strip().splitlines()
    assert len(lines) == 1 and "is being written by another mhacompress run" in lines[0], error
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    assert "partial.bin" in tree(out)  # the winner's folder, whole
    model, _ = mhacompress.load(out)
    assert model.config.compression["key_dim"] == 8



@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["nohup", "background-job-of-a-script"])
def test_a_run_started_with_a_signal_ignored_is_not_stopped_by_it(tmp_path, tiny_bert_dir, signum):
    """`nohup mhacompress ...` ignores the hangup of a closed terminal (a script's `cmd &` ignores Ctrl-C): the run
    must keep ignoring it, not end as 'stopped by SIGHUP'."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = tmp_path / "outs" / "out"
    proc, ready = child(tmp_path, tiny_bert_dir, out, barrier=barrier, ignored=[signum])
    wait_until_saving(proc, ready)
    proc.send_signal(signum)
    time.sleep(0.5)  # time to act on it, were it not ignored
    (barrier / "go").touch()  # let the save finish
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert [p.name for p in out.parent.iterdir()] == ["out"] and "partial.bin" in tree(out)
