"""The analysis: spectra equal the dense ones, effective rank is Roy & Vetterli's, the CP curve is allocate's, and the
`analyze` command writes JSON, figures and the bottleneck warning."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_model
from mhacompress.cli import main
from mhacompress.cli.analyze import FIGURES
from mhacompress.reduction.allocate import cp_error_curve
from mhacompress.reduction.analysis import (
    effective_rank,
    head_spectra,
    shared_bound,
    svd_error_curve,
    unfolding_spectra,
)
from mhacompress.reduction.decompose import head_svd, score_tensor

H, DH, D = 3, 4, 10  # heads, head dim, hidden (d > H*dh: the unfoldings are not square)


def random_weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (H * DH, D)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))


def test_head_spectra_are_the_dense_singular_values():
    wq, wk = random_weights()
    T = score_tensor(wq, wk, H)  # (H, d, d)
    s = head_spectra(wq, wk, H)
    assert s.shape == (H, DH)
    torch.testing.assert_close(s, torch.linalg.svdvals(T)[:, :DH])  # rank <= dh: the rest is zero
    assert torch.linalg.svdvals(T)[:, DH:].max() < 1e-10


def test_unfolding_spectra_are_the_dense_singular_values():
    wq, wk = random_weights(seed=1)
    T = score_tensor(wq, wk, H)
    dense = {"heads": T.reshape(H, D * D), "query": T.permute(1, 0, 2).reshape(D, H * D),
             "key": T.permute(2, 0, 1).reshape(D, H * D)}
    got = unfolding_spectra(wq, wk, H)
    for mode, unfolding in dense.items():
        want = torch.linalg.svdvals(unfolding)
        torch.testing.assert_close(got[mode], want, atol=1e-6 * float(want[0]), rtol=1e-6, msg=mode)
        assert got[mode].square().sum() == pytest.approx(float(T.square().sum()), rel=1e-10)


def test_effective_rank():
    assert effective_rank(torch.ones(7)) == pytest.approx(7)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1)
    assert 1 < effective_rank(torch.tensor([1.0, 0.5, 0.1])) < 3


def test_svd_curve_and_the_shared_bound():
    wq, wk = random_weights(seed=2)
    dims = [3, 6, 9, 12]
    svd = svd_error_curve(head_spectra(wq, wk, H), dims)
    assert svd == pytest.approx({k: head_svd(wq, wk, H, k).relative_error for k in dims}, abs=1e-10)
    bound = shared_bound(unfolding_spectra(wq, wk, H), dims)
    cp = cp_error_curve(wq, wk, H, dims)
    assert all(bound[k] <= cp[k] + 1e-9 for k in dims)
    assert bound[12] < 1e-9 and cp[12] < 1e-9  # k = H*dh: exact (and >= d: nothing left outside U, V)
    assert bound[3] > 0.1


@pytest.mark.parametrize("calibrated", [False, True])
def test_cp_curve_equals_one_decomposition_per_key_dim(calibrated):
    """allocate.error_curves computes the SVD init (and whitening) once per layer: the numbers must not change."""
    from mhacompress.reduction.allocate import error_curves
    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.surgery import decompose_layer

    model = tiny_model("bert")
    config = ReductionConfig(key_dim=1, n_iter_max=30)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moments = [x.T @ x / 64] * 2 if calibrated else None
    dims = [4, 8, 20, 32]
    curves = error_curves(model, config, moments, dims=dims)
    layer = model.encoder.layer[1].attention.self
    for k in dims:
        _, report = decompose_layer(layer.query.weight.detach(), layer.key.weight.detach(), 4, k, config,
                                    moments[1] if calibrated else None)
        assert curves[1][k] == pytest.approx(report.get("expected_score_error", report["relative_error"]), abs=1e-12)
    assert curves[1][32] < 1e-9 and curves[1][4] > curves[1][8] > curves[1][20]


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100)
    path = tmp_path_factory.mktemp("analyze") / "bert"
    BertModel(config).save_pretrained(path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def test_json_has_an_entry_per_layer(tiny_dir):
    result = invoke(tiny_dir, "--json", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["num_layers"], report["heads"], report["head_dim"]) == (2, 4, 8)
    assert [x["index"] for x in report["layers"]] == [0, 1]
    for x in report["layers"]:
        assert len(x["head_spectra"]) == 4 and all(len(s) == 8 for s in x["head_spectra"])
        assert {len(x["unfolding_spectra"][m]) for m in ("query", "key")} == {32}
        assert set(x["cp_error"]) == set(map(str, report["key_dims"])) and x["cp_error"]["32"] < 1e-9
    assert report["warnings"] == [] and report["bottleneck"]["layers"] == []


def test_bottleneck_warning_when_seq_len_exceeds_head_dim(tiny_dir):
    result = invoke(tiny_dir, "--seq-len", "9", "--no-curve")
    assert result.exit_code == 0, result.output
    assert "low-rank bottleneck in every layer" in result.output and "rank <= 8" in result.output
    report = json.loads(invoke(tiny_dir, "--seq-len", "9", "--no-curve", "--json").stdout)
    assert report["bottleneck"]["layers"] == [0, 1] and len(report["warnings"]) == 1
    assert "cp_error" not in report["layers"][0]


def test_plot_writes_pngs(tiny_dir, tmp_path):
    out = tmp_path / "figs" / "nested"
    result = invoke(tiny_dir, "--plot", out, "--key-dims", "4,8,16,32")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["cp_error.png", "head_spectra.png", "unfolding_spectra.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000


def test_a_plot_folder_holds_the_figures_of_one_run(tiny_dir, tmp_path):
    """A cp_error.png of an earlier run (another model, other key dims) is not left beside the figures of a run
    --no-curve --force; the user's own files stay."""
    out = tmp_path / "figs"
    assert invoke(tiny_dir, "--plot", out, "--key-dims", "8").exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = invoke(tiny_dir, "--plot", out, "--no-curve", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["head_spectra.png", "notes.txt", "unfolding_spectra.png"]
    assert sorted(json.loads(result.stdout)["figures"]) == sorted(str(out / p) for p in FIGURES[:2])


def test_figures_already_in_the_plot_folder_are_replaced_only_with_force(tiny_dir, tmp_path):
    """A user's own head_spectra.png, or a cp_error.png that --no-curve would remove, was replaced or deleted
    silently (exit 0): the run is refused and every file stays as it was."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "cp_error.png").write_text("my figure")
    (out / "head_spectra.png").write_text("mine too")
    result = invoke(tiny_dir, "--plot", out, "--no-curve")
    one_line_error(result)
    assert "already holds head_spectra.png, cp_error.png" in result.stderr and "pass --force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cp_error.png", "head_spectra.png"]
    assert (out / "cp_error.png").read_text() == "my figure" and (out / "head_spectra.png").read_text() == "mine too"


def test_figures_are_never_written_into_the_glue_data_folder(tiny_dir, tmp_path, monkeypatch):
    """analyze reads no GLUE data, but $MHACOMPRESS_GLUE_DIR is a data source like the model: its figures went into
    it (probe 24), as no other command's output may."""
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    monkeypatch.setenv("MHACOMPRESS_GLUE_DIR", str(glue))
    message = one_line_error(invoke(tiny_dir, "--plot", glue / "RTE" / "figs", "--no-curve"))
    assert "glue" in message and "--plot" in message
    assert sorted(p.name for p in glue.rglob("*")) == ["RTE"]
    monkeypatch.setenv("MHACOMPRESS_GLUE_DIR", str(tmp_path / "no-such-folder"))  # unusable: analyze does not need it
    assert invoke(tiny_dir, "--plot", tmp_path / "figs", "--no-curve").exit_code == 0


def test_a_run_that_fails_leaves_no_plot_folder_behind(tiny_reduced_dir, tmp_path):
    one_line_error(invoke(tiny_reduced_dir, "--plot", tmp_path / "new" / "figs", "--no-curve"))
    assert list(tmp_path.iterdir()) == []


def test_plotting_without_matplotlib_is_refused_before_the_analysis(tiny_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    monkeypatch.setattr("mhacompress.hub.load_pretrained", lambda *a, **k: pytest.fail("analyzed"))
    assert "pip install 'mhacompress[plot]'" in one_line_error(invoke(tiny_dir, "--plot", tmp_path / "figs"))
    assert list(tmp_path.iterdir()) == []


def one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_errors_are_one_line(tiny_dir, tmp_path):
    assert "no model folder" in one_line_error(invoke(tmp_path / "missing"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "not a folder" in one_line_error(invoke(tiny_dir, "--plot", a_file))
    assert "cannot create --plot folder" in one_line_error(invoke(tiny_dir, "--plot", a_file / "figs"))
    assert "key dims must be in 1..32" in one_line_error(invoke(tiny_dir, "--key-dims", "8,64"), exit_code=2)
    assert "comma-separated" in one_line_error(invoke(tiny_dir, "--key-dims", "8;16"), exit_code=2)
