"""The decompositions: exact where they must be, equal to tensorly's reference where they follow it."""

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker

from mhacompress.reduction.decompose import (
    cp_als,
    cp_exact,
    cp_init,
    cp_relative_error,
    decompose,
    head_svd,
    score_norm2,
    score_tensor,
    tucker2,
)

H, DH, D = 4, 4, 16  # heads, head dim, hidden


def random_weights(seed=0, heads=H, head_dim=DH, hidden=D):
    gen = torch.Generator().manual_seed(seed)
    shape = (heads * head_dim, hidden)
    return (torch.randn(shape, generator=gen, dtype=torch.float64),
            torch.randn(shape, generator=gen, dtype=torch.float64))


def weights_of_cp_rank(rank, seed=0):
    """W_q, W_k whose score tensor has CP rank ``rank`` > dh: head h uses a random subset of dh shared components."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(D, rank, generator=gen, dtype=torch.float64)
    V = torch.randn(D, rank, generator=gen, dtype=torch.float64)
    wq, wk = [], []
    for _ in range(H):
        comps = torch.randperm(rank, generator=gen)[:DH]
        m = torch.rand(DH, generator=gen, dtype=torch.float64) + 0.5
        wq.append((U[:, comps] * m).T)  # (dh, d)
        wk.append(V[:, comps].T)
    return torch.cat(wq), torch.cat(wk)


def dense_cp(f):
    return torch.einsum("hr,dr,er->hde", f.mixing, f.U, f.V)


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_score_tensor_norm_matches_dense():
    wq, wk = random_weights()
    T = score_tensor(wq, wk, H)
    assert T.shape == (H, D, D)
    torch.testing.assert_close(T[2], wq[8:12].T @ wk[8:12])
    assert float(score_norm2(wq, wk, H)) == pytest.approx(float((T**2).sum()), rel=1e-12)


def test_closed_form_cp_at_full_rank_is_exact():
    wq, wk = random_weights()
    f = cp_exact(wq, wk, H)
    assert f.relative_error == 0.0
    torch.testing.assert_close(dense_cp(f), score_tensor(wq, wk, H), rtol=0, atol=1e-12)
    assert cp_als(wq, wk, H, H * DH).relative_error == 0.0  # cp_als takes the closed form at H*dh


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_every_solver_is_exact_at_the_full_key_dim(method):
    """`--solver tensorly` ran parafac's ALS at H*dh too, which stops short of exact (relative error 0.03-0.07 on a
    tiny BERT): a full-key-dim reduction must reproduce the original whichever solver is asked."""
    wq, wk = random_weights(seed=5)
    for solver in ("structured", "tensorly"):
        assert decompose(wq, wk, H, H * DH, method, solver=solver).relative_error < 1e-6, solver


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cp_recovers_a_tensor_of_known_rank(init, seed):
    wq, wk = weights_of_cp_rank(rank=6, seed=seed)
    f = cp_als(wq, wk, H, 6, n_iter_max=3000, tol=1e-12, init=init, random_state=seed, compute_dtype=torch.float64)
    assert f.relative_error < 1e-4
    assert rel(dense_cp(f), score_tensor(wq, wk, H)) < 1e-4


def test_cp_follows_tensorly_parafac_iterate_for_iterate():
    wq, wk = random_weights(seed=3)
    T = score_tensor(wq, wk, H).numpy()
    U0, V0 = cp_init(wq, wk, H, 6)
    ours = cp_als(wq, wk, H, 6, n_iter_max=15, tol=0, init=(U0, V0), compute_dtype=torch.float64)
    M0 = cp_als(wq, wk, H, 6, n_iter_max=0, init=(U0, V0), compute_dtype=torch.float64).mixing  # LS mixing for U0, V0
    ref, errors = parafac(T, 6, init=(np.ones(6), [M0.numpy(), U0.numpy(), V0.numpy()]), n_iter_max=15, tol=0,
                          return_errors=True)
    np.testing.assert_allclose(ours.U.numpy(), ref.factors[1], atol=1e-8)
    np.testing.assert_allclose(ours.V.numpy(), ref.factors[2], atol=1e-8)
    np.testing.assert_allclose(ours.errors, errors, rtol=1e-9)


def test_cp_error_is_the_dense_error_and_no_worse_than_tensorly():
    wq, wk = random_weights(seed=4)
    T = score_tensor(wq, wk, H)
    f = cp_als(wq, wk, H, 8, n_iter_max=500, tol=1e-10)
    assert f.relative_error == pytest.approx(rel(dense_cp(f), T), abs=1e-10)
    ref = parafac(T.numpy(), 8, init="random", random_state=0, n_iter_max=500, tol=1e-10)
    ref_error = float(np.linalg.norm(T.numpy() - tl.cp_to_tensor(ref)) / np.linalg.norm(T.numpy()))
    assert f.relative_error <= ref_error + 1e-3


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_error_does_not_increase_with_key_dim(method):
    wq, wk = random_weights(seed=5)
    errors = [decompose(wq, wk, H, k, method).relative_error for k in (4, 8, 12, 16)]
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_same_seed_gives_bit_identical_factors_and_seeds_matter_for_random_init():
    wq, wk = random_weights(seed=6)
    a = cp_als(wq, wk, H, 6, init="random", random_state=7)
    b = cp_als(wq, wk, H, 6, init="random", random_state=7)
    c = cp_als(wq, wk, H, 6, init="random", random_state=8)
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V) and torch.equal(a.mixing, b.mixing)
    assert not torch.equal(a.U, c.U)


def test_float32_products_reach_the_float64_error():
    wq, wk = random_weights(seed=7, heads=8, head_dim=8, hidden=64)
    f32 = cp_als(wq, wk, 8, 24, n_iter_max=60, tol=0)
    f64 = cp_als(wq, wk, 8, 24, n_iter_max=60, tol=0, compute_dtype=torch.float64)
    assert f32.relative_error == pytest.approx(f64.relative_error, abs=1e-4)
    assert f32.relative_error == pytest.approx(cp_relative_error(wq, wk, 8, f32.U, f32.V, f32.mixing), abs=1e-12)


def test_tucker_matches_tensorly_partial_tucker():
    wq, wk = random_weights(seed=8)
    T = score_tensor(wq, wk, H)
    f = tucker2(wq, wk, H, 8, n_iter_max=200, tol=1e-12)
    (core, factors), _ = partial_tucker(T.numpy(), [8, 8], modes=[1, 2], n_iter_max=200, tol=1e-12)
    ref = tl.tenalg.multi_mode_dot(core, factors, modes=[1, 2])
    ref_error = float(np.linalg.norm(T.numpy() - ref) / np.linalg.norm(T.numpy()))
    dense = torch.einsum("dr,hrs,es->hde", f.U, f.mixing, f.V)
    assert f.relative_error == pytest.approx(rel(dense, T), abs=1e-9)
    assert f.relative_error == pytest.approx(ref_error, abs=1e-6)


def test_tucker_at_full_rank_is_exact():
    wq, wk = random_weights(seed=9)
    f = tucker2(wq, wk, H, D)
    assert f.relative_error < 1e-6
    torch.testing.assert_close(torch.einsum("dr,hrs,es->hde", f.U, f.mixing, f.V), score_tensor(wq, wk, H))


def test_head_svd_is_eckart_young_per_head():
    wq, wk = random_weights(seed=10)
    T = score_tensor(wq, wk, H)
    f = head_svd(wq, wk, H, 8)  # 2 components per head
    dense = torch.einsum("hdr,her->hde", f.U, f.V)
    for h in range(H):
        u, s, vt = torch.linalg.svd(T[h])
        torch.testing.assert_close(dense[h], (u[:, :2] * s[:2]) @ vt[:2])
    assert f.relative_error == pytest.approx(rel(dense, T), abs=1e-10)
    assert head_svd(wq, wk, H, H * DH).relative_error < 1e-7


def test_bad_ranks_are_refused():
    wq, wk = random_weights()
    with pytest.raises(AssertionError, match="rank must be in 1..16"):
        cp_als(wq, wk, H, 17)
    with pytest.raises(AssertionError, match="multiple of 4 heads"):
        head_svd(wq, wk, H, 6)
    with pytest.raises(ValueError, match="method must be one of"):
        decompose(wq, wk, H, 4, "pca")


@pytest.mark.parametrize("method,key_dim", [("cp", 6), ("tucker", 6), ("svd", 8)])
def test_generic_relative_error_is_the_dense_error(method, key_dim):
    from mhacompress.reduction.decompose import relative_error

    wq, wk = random_weights(seed=11)
    f = decompose(wq, wk, H, key_dim, method)
    f.U, f.V = f.U * 1.1, f.V * 0.9  # factors the solver did not produce (e.g. mapped back from whitening)
    if method == "svd":
        dense = torch.einsum("hdr,her->hde", f.U, f.V)
    elif method == "tucker":
        dense = torch.einsum("dr,hrs,es->hde", f.U, f.mixing, f.V)
    else:
        dense = dense_cp(f)
    assert relative_error(wq, wk, H, f) == pytest.approx(rel(dense, score_tensor(wq, wk, H)), abs=1e-10)


# ---- the tensorly reference solvers ------------------------------------------------------------------------


def test_cp_tensorly_follows_the_structured_als_from_the_same_start():
    from mhacompress.reduction.decompose import cp_tensorly

    wq, wk = random_weights(seed=12)
    ours = cp_als(wq, wk, H, 6, n_iter_max=20, tol=0, compute_dtype=torch.float64)
    ref = cp_tensorly(wq, wk, H, 6, n_iter_max=20, tol=0)  # same svd start, M at its least-squares optimum
    np.testing.assert_allclose(ref.errors, ours.errors, rtol=1e-9)
    torch.testing.assert_close(ref.U, ours.U, rtol=0, atol=1e-8)
    assert ref.relative_error == pytest.approx(rel(dense_cp(ref), score_tensor(wq, wk, H)), abs=1e-10)


def test_cp_tensorly_random_init_is_tensorlys_own_seeded_start():
    from mhacompress.reduction.decompose import cp_tensorly

    wq, wk = random_weights(seed=13)
    ours = cp_tensorly(wq, wk, H, 6, init="random", random_state=3, n_iter_max=30, tol=0)
    ref, errors = parafac(score_tensor(wq, wk, H).numpy(), 6, init="random", random_state=3, n_iter_max=30, tol=0,
                          return_errors=True)
    np.testing.assert_allclose(ours.errors, errors, rtol=1e-9)
    assert ours.n_iter == 30


def test_tucker_tensorly_matches_the_structured_hooi():
    from mhacompress.reduction.decompose import tucker_tensorly

    wq, wk = random_weights(seed=14)
    ours, ref = tucker2(wq, wk, H, 6, n_iter_max=50, tol=0), tucker_tensorly(wq, wk, H, 6, n_iter_max=50, tol=0)
    np.testing.assert_allclose(ref.errors, ours.errors, rtol=1e-9)
    dense = torch.einsum("dr,hrs,es->hde", ref.U, ref.mixing, ref.V)
    assert ref.relative_error == pytest.approx(rel(dense, score_tensor(wq, wk, H)), abs=1e-10)
    assert ref.relative_error == pytest.approx(ours.relative_error, abs=1e-9)


def test_svd_tensorly_is_the_same_per_head_truncation():
    from mhacompress.reduction.decompose import svd_tensorly

    wq, wk = random_weights(seed=15)
    ours, ref = head_svd(wq, wk, H, 8), svd_tensorly(wq, wk, H, 8)
    torch.testing.assert_close(torch.einsum("hdr,her->hde", ref.U, ref.V), torch.einsum("hdr,her->hde", ours.U, ours.V))
    assert ref.relative_error == pytest.approx(ours.relative_error, abs=1e-10)


@pytest.mark.parametrize("method,key_dim", [("cp", 6), ("tucker", 6), ("svd", 8)])
def test_decompose_dispatches_on_the_solver(method, key_dim):
    wq, wk = random_weights(seed=16)
    structured = decompose(wq, wk, H, key_dim, method)
    reference = decompose(wq, wk, H, key_dim, method, solver="tensorly")
    assert reference.method == method
    assert reference.relative_error == pytest.approx(structured.relative_error, abs=2e-3)
    with pytest.raises(ValueError, match="solver must be one of structured, tensorly"):
        decompose(wq, wk, H, key_dim, method, solver="numpy")


# ---- many layers at once, single-threaded workers ------------------------------------------------------------


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_decompose_layers_gives_each_layers_own_factors_in_order(method):
    from mhacompress.reduction.decompose import decompose_layers

    layers = [random_weights(seed=20 + i) for i in range(5)]
    ranks = [4, 8, 12, 8, 4]
    done = []
    together = decompose_layers(layers, H, ranks, method, workers=3, on_layer=lambda i, f: done.append((i, f)))
    assert sorted(i for i, _ in done) == [0, 1, 2, 3, 4] and all(together[i] is f for i, f in done)
    for (wq, wk), k, f in zip(layers, ranks, together):
        alone = decompose(wq, wk, H, k, method)
        assert torch.equal(f.U, alone.U) and torch.equal(f.V, alone.V), "a worker's result differs from one call"
        assert f.relative_error == alone.relative_error


def test_cp_als_batched_is_decompose_layers_with_one_rank_and_checks_the_rank_count():
    from mhacompress.reduction.decompose import cp_als_batched, decompose_layers

    layers = [random_weights(seed=30), random_weights(seed=31)]
    batched = cp_als_batched(layers, H, 6, init="random", random_state=2, workers=2)
    assert [f.relative_error for f in batched] == [cp_als(wq, wk, H, 6, init="random", random_state=2).relative_error
                                                   for wq, wk in layers]
    with pytest.raises(ValueError, match="3 ranks given for 2 layers"):
        decompose_layers(layers, H, [4, 4, 4])


def test_solvers_run_single_threaded_and_leave_the_thread_count_alone(monkeypatch):
    import mhacompress.reduction.decompose as dec

    seen = []
    real = dec._half_step
    monkeypatch.setattr(dec, "_half_step", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    wq, wk = random_weights(seed=32)
    cp_als(wq, wk, H, 6, n_iter_max=2, tol=0)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("broken", ["inner", "FtF"])
def test_a_float32_breakdown_is_redone_in_float64(monkeypatch, broken):
    """Badly conditioned (whitened) weights can drive the float32 products to NaN; the ALS then starts again in
    float64 and returns what a float64 run returns, never NaN factors. ``FtF``: iterates that underflow (a one-line
    calibration file: whitened weights of rank 3) leave NaN in the next sweep's Gram matrices, not only in its error:
    pinv raised a LinAlgError (a traceback from `reduce`) before the error was looked at."""
    from mhacompress.reduction import decompose as dec

    gen = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(16, 12, generator=gen, dtype=torch.float64), torch.randn(16, 12, generator=gen,
                                                                                  dtype=torch.float64)
    want = dec.cp_als(wq, wk, 4, 6, compute_dtype=torch.float64)
    real, calls = dec._half_step, []

    def breaks_in_float32(gram_w, X, S):
        step = real(gram_w, X, S)
        calls.append(gram_w.dtype)
        if gram_w.dtype == torch.float32 and len(calls) > 4:
            setattr(step, broken, getattr(step, broken) * float("nan"))
        return step

    monkeypatch.setattr(dec, "_half_step", breaks_in_float32)
    got = dec.cp_als(wq, wk, 4, 6)
    assert torch.float32 in calls and calls[-1] == torch.float64
    torch.testing.assert_close(got.U, want.U)
    torch.testing.assert_close(got.mixing, want.mixing)
    assert got.errors == want.errors


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_a_layer_whose_scores_are_all_zero_is_reduced_exactly_by_every_method(method):
    """A layer with W_k = 0 (pruned, or zeroed by hand) scores every token pair 0: cp_als raised FloatingPointError
    (a traceback from `reduce` and `analyze`), svd and tucker reported a NaN error (null in the JSON report)."""
    from mhacompress.reduction import methods

    wq, _ = random_weights(seed=5)
    f = methods.get(method).solve(wq, torch.zeros_like(wq), H, 8)
    assert f.relative_error == 0.0
    assert all(torch.isfinite(t).all() for t in (f.U, f.V) + ((f.mixing,) if f.mixing is not None else ()))
