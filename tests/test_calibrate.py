"""Data-aware reduction: exact at full rank, never worse than plain CP on the calibration data it was fitted to."""

import copy
import json

import pytest
import torch

from conftest import final_error, padded_batch, tiny_model
from mhacompress.calibration import calibration_texts
from mhacompress.errors import UsageError
from mhacompress.reduction.calibrate import second_moments, unwhiten, whiten, whitening
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.decompose import Factors, decompose, relative_error
from mhacompress.reduction.surgery import reduce_

H, DH, D = 4, 4, 16


def anisotropic_problem(seed=0):
    """Random W_q, W_k and a second moment whose energy sits in a few directions (as real hidden states do)."""
    gen = torch.Generator().manual_seed(seed)
    wq, wk = (torch.randn(H * DH, D, generator=gen, dtype=torch.float64) for _ in range(2))
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(2, -2, D, dtype=torch.float64)
    return wq, wk, (basis * spectrum) @ basis.T


def expected_score_error(wq, wk, moment, factors):
    """Relative E[(x^T (A - A_hat) y)^2], computed in the whitened space from unwhitened factors."""
    sqrt, _ = whitening(moment)
    whitened = unwhiten(factors, sqrt)  # U <- C^1/2 U maps factors of A to factors of C^1/2 A C^1/2
    return relative_error(wq @ sqrt, wk @ sqrt, H, whitened)


def test_whitening_is_a_square_root_and_its_inverse():
    _, _, moment = anisotropic_problem()
    sqrt, inv_sqrt = whitening(moment)
    torch.testing.assert_close(sqrt @ sqrt, moment)
    torch.testing.assert_close(sqrt @ inv_sqrt, torch.eye(D, dtype=torch.float64))


def test_whitening_floors_the_eigenvalues_at_eps_times_the_largest():
    """Rank-deficient data at a tiny scale (a direction the tokens never take, eigenvalues 4e-8, 1e-8, 0): the
    missing eigenvalue is raised to eps x the largest, relative to the data, and the others are kept."""
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    moment = (basis * torch.tensor([4e-8, 1e-8, 0.0], dtype=torch.float64)) @ basis.T
    floored = torch.tensor([4e-8, 1e-8, 4e-8 * 1e-6], dtype=torch.float64)
    sqrt, inv_sqrt = whitening(moment, eps=1e-6)
    torch.testing.assert_close(sqrt, (basis * floored.sqrt()) @ basis.T, rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_sqrt, (basis * floored.rsqrt()) @ basis.T, rtol=1e-6, atol=0)


def test_shrinkage_raises_every_eigenvalue_by_a_share_of_their_mean():
    """whitening(C, shrink=r) is the square root of C + r x tr(C)/d x I: the moment pulled towards a multiple of the
    identity, by the same amount in every direction (so a direction the sample makes small is not made tiny)."""
    _, _, moment = anisotropic_problem(seed=6)
    sqrt, inv_sqrt = whitening(moment, shrink=0.3)
    shrunk = moment + 0.3 * torch.trace(moment) / D * torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(sqrt @ sqrt, shrunk)
    torch.testing.assert_close(inv_sqrt @ shrunk @ inv_sqrt, torch.eye(D, dtype=torch.float64))


def test_whiten_takes_the_query_and_the_key_moment_on_their_own_sides():
    """With query inputs of second moment Cq and independent key inputs of Ck, the whitened head's squared norm is
    the expected squared score E[(x^T A_h y)^2] = tr(Cq A_h Ck A_h^T), and the maps back give A_h: directly, and
    through unwhiten on exact factors of the whitened heads (U_h = W~_q^h^T, V_h = W~_k^h^T)."""
    wq, wk, cq = anisotropic_problem(seed=3)
    ck = anisotropic_problem(seed=4)[2] + torch.eye(D, dtype=torch.float64)
    wq_w, wk_w, inv_q, inv_k = whiten(wq, wk, cq, ck)
    exact = Factors("svd", wq_w.view(H, DH, D).transpose(1, 2), wk_w.view(H, DH, D).transpose(1, 2), None, 0.0)
    back = unwhiten(exact, inv_q, inv_k)
    for h in range(H):
        rows = slice(h * DH, (h + 1) * DH)
        a = wq[rows].T @ wk[rows]
        whitened = wq_w[rows].T @ wk_w[rows]
        torch.testing.assert_close(whitened.pow(2).sum(), torch.trace(cq @ a @ ck @ a.T))
        torch.testing.assert_close(inv_q @ whitened @ inv_k, a)
        torch.testing.assert_close(back.U[h] @ back.V[h].T, a)


def test_expected_score_error_matches_a_monte_carlo_estimate():
    wq, wk, moment = anisotropic_problem(seed=1)
    f = decompose(wq, wk, H, 6, "cp")
    gen = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(moment)
    x, y = (torch.randn(200_000, D, generator=gen, dtype=torch.float64) @ chol.T for _ in range(2))
    T = torch.einsum("hid,hie->hde", wq.view(H, DH, D), wk.view(H, DH, D))
    T_hat = torch.einsum("hr,dr,er->hde", f.mixing, f.U, f.V)
    err = torch.einsum("nd,hde,ne->nh", x, T - T_hat, y).pow(2).mean()
    ref = torch.einsum("nd,hde,ne->nh", x, T, y).pow(2).mean()
    assert expected_score_error(wq, wk, moment, f) == pytest.approx(float((err / ref).sqrt()), rel=0.02)


@pytest.mark.parametrize("method,key_dim", [("cp", 6), ("tucker", 6), ("svd", 8)])
def test_calibrated_error_is_never_worse_on_the_calibration_data(method, key_dim):
    wq, wk, moment = anisotropic_problem(seed=2)
    sqrt, inv_sqrt = whitening(moment)
    plain = decompose(wq, wk, H, key_dim, method)
    calibrated = unwhiten(decompose(wq @ sqrt, wk @ sqrt, H, key_dim, method), inv_sqrt)
    assert expected_score_error(wq, wk, moment, calibrated) < expected_score_error(wq, wk, moment, plain)
    assert relative_error(wq, wk, H, calibrated) >= relative_error(wq, wk, H, plain) - 1e-9  # traded weight error


def tiny_with_moments():
    model = tiny_model("bert")
    batch = padded_batch(lengths=(9, 4, 7, 1, 8, 6))
    return model, batch, second_moments(model, [batch])


def test_second_moments_count_real_tokens_only():
    model, batch, moments = tiny_with_moments()
    assert len(moments) == 2 and moments[0].shape == (32, 32)
    with torch.no_grad():
        emb = model.embeddings(input_ids=batch["input_ids"])  # the first layer's input
    real = emb[batch["attention_mask"].bool()].double()
    torch.testing.assert_close(moments[0], real.T @ real / real.shape[0])


def test_calibrated_reduction_is_exact_at_full_key_dim():
    model, batch, moments = tiny_with_moments()
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    block = reduce_(model, ReductionConfig(key_dim=32), moments=moments)
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert (after[keep] - before[keep]).abs().max() <= 1e-5
    assert all(x["expected_score_error"] < 1e-6 for x in block["layers"])


def test_calibrated_reduction_reports_expected_score_error():
    model, _, moments = tiny_with_moments()
    block = reduce_(model, ReductionConfig(key_dim=8), moments=moments)
    assert all(0 < x["expected_score_error"] < 1 and 0 < x["relative_error"] for x in block["layers"])


def anisotropic_tiny_bert():
    """A tiny BERT whose hidden states are anisotropic, as real ones are: the embeddings' LayerNorm scales its 32
    directions from x30 down to x0.03, and calibration batches of mixed lengths (padded)."""
    model = tiny_model("bert")
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.copy_(torch.logspace(1.5, -1.5, 32))
    batches = [padded_batch(lengths=(12, 9, 4, 7, 1, 8, 6, 11), seed=seed) for seed in range(4)]
    return model, batches


def test_calibrated_reduce_beats_weights_only_on_anisotropic_inputs():
    """Through reduce_ itself: decomposing in the whitened space brings the reduced model's outputs on the
    calibration data much closer to the original's than a reduction of the weights alone at the same key dim
    (measured: 0.15 vs 0.33)."""
    original, batches = anisotropic_tiny_bert()
    calibrated, weights_only = copy.deepcopy(original), copy.deepcopy(original)
    config = ReductionConfig(key_dim=16, n_iter_max=30)
    reduce_(calibrated, config, moments=second_moments(original, batches))
    reduce_(weights_only, config)
    assert final_error(calibrated, original, batches) < 0.6 * final_error(weights_only, original, batches)


def test_calibration_sources(tmp_path, glue_dir):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n")
    assert calibration_texts(str(tmp_path / "a.txt"), 10) == [("one",), ("two",), ("three",)]
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n{"sentence1": "a", "sentence2": "b", "label": 1}\n')
    assert calibration_texts(str(tmp_path / "b.jsonl"), 10) == [("hello",), ("a", "b")]
    assert calibration_texts(str(tmp_path / "b.jsonl"), 10, pairs=False) == [("hello",), ("a",), ("b",)]
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n"hi"\n" "\n{"sentence1": "a", "sentence2": ""}\n')
    assert calibration_texts(str(tmp_path / "c.jsonl"), 10) == [("hi",), ("a",)]  # empty texts skipped like blank lines
    records = [  # MultiNLI's and SNLI's own layouts: their metadata strings come first
        {"annotator_labels": ["neutral"], "genre": "government", "gold_label": "neutral", "pairID": "31193n",
         "sentence1": "Conceptually cream skimming has two dimensions.", "sentence1_parse": "(ROOT (S ...))",
         "sentence2": "Product and geography are what make it work."},
        {"captionID": "3416050480.jpg#4", "gold_label": "neutral", "sentence1": "A person on a horse.",
         "sentence2": "A person is training."},
        {"id": "5733be28", "title": "University_of_Notre_Dame", "context": "Architecturally, the school ...",
         "question": "To whom did the Virgin Mary appear?"},  # SQuAD's
        {"pairID": "7", "review_label": "pos", "body": "A fine film."},  # no known field: strings minus metadata
    ]
    (tmp_path / "nli.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert calibration_texts(str(tmp_path / "nli.jsonl"), 10) == [
        ("Conceptually cream skimming has two dimensions.", "Product and geography are what make it work."),
        ("A person on a horse.", "A person is training."),
        ("Architecturally, the school ...", "To whom did the Virgin Mary appear?"), ("A fine film.",)]
    # one sequence a line: a form feed or U+2028 inside a sentence (raw in a JSON string too) does not end it
    (tmp_path / "f.txt").write_text("one\fstill one\r\ntwo\u2028still two\n", newline="")
    assert calibration_texts(str(tmp_path / "f.txt"), 10) == [("one\fstill one",), ("two\u2028still two",)]
    (tmp_path / "f.jsonl").write_text('{"text": "three\u2028still three"}\n', encoding="utf-8")
    assert calibration_texts(str(tmp_path / "f.jsonl"), 10) == [("three\u2028still three",)]
    (tmp_path / "D.JSONL").write_text('{"text": "hello"}\n')  # the kind of file is read from its suffix in any case
    assert calibration_texts(str(tmp_path / "D.JSONL"), 10) == [("hello",)]  # not the line '{"text": "hello"}'
    (tmp_path / "E.JSON").write_text('["hello"]')
    with pytest.raises(UsageError, match="is a .json file"):
        calibration_texts(str(tmp_path / "E.JSON"), 10)
    texts = calibration_texts("mrpc", 16, data_dir=str(glue_dir))
    assert len(texts) == 16 and all(len(t) == 2 for t in texts)
    assert texts == calibration_texts("mrpc", 16, data_dir=str(glue_dir))  # seeded


def test_a_task_name_means_the_task_whatever_the_current_folder_holds(tmp_path, glue_dir, monkeypatch):
    """A file named mrpc in the current folder was calibrated on, recorded as 'mrpc' (the task); a folder named rte
    (`finetune -t rte -o rte`) made `reduce rte --eval rte` fail. A path to such a file says ./mrpc."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mrpc").write_text("junk line\n" * 40)
    (tmp_path / "rte").mkdir()
    task = calibration_texts("mrpc", 16, data_dir=str(glue_dir))
    assert len(task) == 16 and all(len(t) == 2 for t in task)  # MRPC's sentence pairs, not the junk
    assert len(calibration_texts("RTE", 8, data_dir=str(glue_dir))) == 8
    assert calibration_texts("./mrpc", 16) == [("junk line",)] * 16


@pytest.mark.parametrize("source,message", [
    ("nope.txt", "no calibration file"), ("notatask", r"unknown task .notatask.*Calibration\(source\)"),
])
def test_bad_calibration_sources(source, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        calibration_texts(source, 8)


def test_a_calibration_file_too_large_to_read_whole_is_refused_with_how_to_sample_it(tmp_path, monkeypatch):
    """A file is read whole, at about 4x its size in memory (a 400 MB file: 1.5 GB more), to draw a few hundred lines:
    a multi-GB corpus ended in an out-of-memory error that suggested options reduce does not have."""
    import mhacompress.calibration as calibration

    (tmp_path / "big.txt").write_text("a line of text\n" * 100)  # 1,500 bytes
    monkeypatch.setattr(calibration, "FILE_LIMIT", 1000)
    with pytest.raises(UsageError, match=r"big.txt is 0 MiB, .* read whole \(at most 0 MiB\); .*shuf -n 10000"):
        calibration_texts(str(tmp_path / "big.txt"), 8)
    monkeypatch.setattr(calibration, "FILE_LIMIT", 1500)
    assert len(calibration_texts(str(tmp_path / "big.txt"), 8)) == 8


@pytest.mark.parametrize("record,message", [
    ({"sentence1": "The cat sat.", "sentence2": 5}, "its sentence2 field is not a string"),  # was a single sentence
    ({"premise": "A", "question": "B", "hypothesis": "C"}, r"3 text fields \(premise, question, hypothesis\)"),
])
def test_a_jsonl_record_whose_text_fields_cannot_all_be_read_is_refused(tmp_path, record, message):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n' + json.dumps(record) + "\n")
    with pytest.raises(UsageError, match="c.jsonl:2: " + message):
        calibration_texts(str(tmp_path / "c.jsonl"), 8)


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UsageError, match="c.jsonl:2 is not valid JSON"):
        calibration_texts(str(tmp_path / "c.jsonl"), 8)


@pytest.mark.parametrize("moment,fragment", [(torch.eye(5), r"second moment 0 has shape \(5, 5\); .*\(32, 32\)"),
                                             (torch.ones(32), r"second moment 0 has shape \(32,\)"),
                                             (torch.full((32, 32), float("nan")), "second moment 0 holds NaN"),
                                             (torch.zeros(32, 32), "second moment 0 is zero"),
                                             (torch.eye(32, dtype=torch.complex64), "is a torch.complex64 tensor"),
                                             (torch.eye(32, dtype=torch.bool), "is a torch.bool tensor")])
def test_reduce_refuses_moments_of_another_shape_or_not_finite_before_any_layer(moment, fragment):
    """They were a RuntimeError from the whitening's matmul ('mat1 and mat2 shapes cannot be multiplied') or the
    solver's 'cp_als broke down', from inside the reduction; a zero moment gave NaN weights without a word (and save
    wrote them), a complex one lost its imaginary part with only a torch warning."""
    model = tiny_model("bert")
    with pytest.raises(UsageError, match=fragment) as err:
        reduce_(model, ReductionConfig(key_dim=8), moments=[moment, torch.eye(32)])
    assert "\n" not in str(err.value)
    assert type(model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"  # untouched
