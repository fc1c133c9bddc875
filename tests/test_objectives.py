"""The output objective against known answers: the key metric is the first-order change of the attention output, the
closed-form solve is the truncated SVD in that metric, the content bias keeps the mean query exact, rollout follows
the attention maps, and the measured sensitivity leaves the model as it was."""

import pytest
import torch

from conftest import padded_batch, tiny_model
from mhacompress.reduction import methods
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.decompose import Factors
from mhacompress.reduction.modeling import layers
from mhacompress.reduction.objectives import (
    QUERY_MAP_FEW_ROWS,
    QUERY_MAP_RIDGE,
    SHRINKAGE,
    OutputMoments,
    centred_content_bias,
    head_gram,
    key_side,
    norm_gain,
    output_metric,
    readout_weights,
    ridge_map,
    rollout,
    whitened_problem,
)
from mhacompress.reduction.sensitivity import candidates, divergence, output_curves
from mhacompress.reduction.sequential import Plan, solve_output
from mhacompress.reduction.surgery import content_bias

f64 = torch.float64


def attention_case(B=2, H=3, T=5, dh=4, d_out=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, T, T, generator=gen, dtype=f64) * 2
    tokens = torch.ones(B, T, dtype=torch.bool)
    tokens[1, 3:] = False  # padding
    scores = scores.masked_fill(~tokens[:, None, None, :], -torch.inf)
    v = torch.randn(B, H, T, dh, generator=gen, dtype=f64)
    wo = torch.randn(d_out, H * dh, generator=gen, dtype=f64)
    weights = torch.rand(B, T, generator=gen, dtype=f64) * tokens
    return scores, v, wo, tokens, weights


def output(scores, v, wo):
    """Every query's attention output W_O ctx (B, T, d_out)."""
    ctx = scores.softmax(-1) @ v  # (B, H, T, dh)
    B, H, T, dh = ctx.shape
    return ctx.transpose(1, 2).reshape(B, T, H * dh) @ wo.T


def test_the_key_metric_is_the_first_order_change_of_the_attention_output():
    """A score change a_j of every key (all queries) of head h moves the weighted outputs by a^T S_h a to first
    order: the metric, checked against the real softmax by a small finite step. S sums the heads' metrics (the
    cross-head terms of the output error are left out: heads are fitted for their own effect)."""
    scores, v, wo, tokens, weights = attention_case()
    H, x = v.shape[1], torch.zeros(2, 5, 1, dtype=f64)
    p, gram = scores.softmax(-1), head_gram(wo, H)
    a = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=f64) * tokens
    eps, total = 1e-6, 0
    for h in range(H):
        S_h, _ = output_metric(x, p[:, h:h + 1], v[:, h:h + 1], gram[h:h + 1], tokens, weights)
        step = torch.zeros_like(scores)
        step[:, h] = eps * a[:, None, :]
        moved = output(scores + step, v, wo) - output(scores, v, wo)  # (B, T, d_out)
        actual = (weights[..., None] * moved.pow(2)).sum((1, 2)) / eps**2  # per sequence
        torch.testing.assert_close(torch.einsum("bj,bjk,bk->b", a, S_h, a), actual, rtol=1e-4, atol=1e-8)
        total = total + S_h
    torch.testing.assert_close(output_metric(x, p, v, gram, tokens, weights)[0], total)


def test_the_head_shares_are_each_heads_part_of_the_output_error():
    """share_h = tr(Y^T S_h Y): the metric of head h alone, seen through the inputs."""
    scores, v, wo, tokens, weights = attention_case()
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2), dtype=f64)
    p, gram = scores.softmax(-1), head_gram(wo, 3)
    _, share = output_metric(x, p, v, gram, tokens, weights)
    for h in range(3):
        S_h, _ = output_metric(x, p[:, h:h + 1], v[:, h:h + 1], gram[h:h + 1], tokens, weights)
        torch.testing.assert_close(share[h], torch.einsum("btd,bts,bsd->", x, S_h, x))


def moments_of(d=8, heads=2, seed=0):
    """Output moments of random, anisotropic inputs and a random positive key metric (the original stream only)."""
    gen = torch.Generator().manual_seed(seed)
    m = OutputMoments(d, heads)
    for _ in range(3):
        x = torch.randn(4, 10, d, generator=gen, dtype=f64) @ torch.diag(torch.logspace(-1, 1, d, dtype=f64)) + 0.3
        tokens = torch.ones(4, 10, dtype=torch.bool)
        r = torch.randn(4, 10, 10, generator=gen, dtype=f64)
        S = r @ r.transpose(-1, -2)
        weights = torch.rand(4, 10, generator=gen, dtype=f64) + 0.5
        m.add(x, x, tokens, weights, S, torch.tensor([1.0, 4.0], dtype=f64))
    return m


def test_the_closed_form_solve_is_the_truncated_svd_in_the_shrunk_output_metric():
    """Per-head SVD under the output objective: A_hat_h = Cq^-1/2 [Cq^1/2 A_h Ck^1/2]_r Ck^-1/2, the best rank-r fit
    in the metric, whatever the head weights (heads are independent); unequal shares make a wrong unscaling fail.
    Each metric is shrunk towards the identity first: C + SHRINKAGE x mean eigenvalue x I."""
    d, heads, dh, r = 8, 2, 4, 2
    gen = torch.Generator().manual_seed(3)
    wq, wk = torch.randn(heads * dh, d, generator=gen, dtype=f64), torch.randn(heads * dh, d, generator=gen, dtype=f64)
    m = moments_of(d, heads)
    config = ReductionConfig(key_dim=heads * r, method="svd")
    f, _, report = solve_output(wq, None, wk, heads, heads * r, config, m, identity=True)
    assert report["head_weights"][0] != report["head_weights"][1]

    def power(c, e):
        evals, vecs = torch.linalg.eigh(c)
        return (vecs * evals.pow(e)) @ vecs.T

    cq, ck = (c + SHRINKAGE * torch.trace(c) / d * torch.eye(d, dtype=f64) for c in (m.query_metric(), m.key_metric()))
    for h in range(heads):
        a = wq[h * dh:(h + 1) * dh].T @ wk[h * dh:(h + 1) * dh]  # (d, d)
        u, s, vt = torch.linalg.svd(power(cq, 0.5) @ a @ power(ck, 0.5))
        want = power(cq, -0.5) @ (u[:, :r] * s[:r]) @ vt[:r] @ power(ck, -0.5)
        torch.testing.assert_close(f.U[h] @ f.V[h].T, want)


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_the_content_bias_keeps_the_mean_query_exact(method):
    """For the (weighted) mean query input, reduced scores mu^T A_hat_h y + c_h . y equal the original
    (W_q^h mu + b_q^h) . W_k^h y for every key y, at any key dim."""
    d, heads, dh = 8, 2, 4
    gen = torch.Generator().manual_seed(4)
    wq, wk = torch.randn(heads * dh, d, generator=gen, dtype=f64), torch.randn(heads * dh, d, generator=gen, dtype=f64)
    bq = torch.randn(heads * dh, generator=gen, dtype=f64)
    m = moments_of(d, heads)
    f, bias, _ = solve_output(wq, bq, wk, heads, 4, ReductionConfig(key_dim=4, method=method), m, identity=True)
    mu = m.means()[0]
    y = torch.randn(d, 5, generator=gen, dtype=f64)
    reduced = key_side(f, mu) @ y + bias @ y  # (H, 5)
    original = torch.einsum("hi,hid->hd", (wq @ mu + bq).view(heads, dh), wk.view(heads, dh, d)) @ y
    torch.testing.assert_close(reduced, original)


def test_at_full_rank_the_centred_bias_is_the_plain_content_bias():
    d, heads, dh = 8, 2, 4
    gen = torch.Generator().manual_seed(5)
    wq, wk = torch.randn(heads * dh, d, generator=gen, dtype=f64), torch.randn(heads * dh, d, generator=gen, dtype=f64)
    bq, mu = torch.randn(heads * dh, generator=gen, dtype=f64), torch.randn(d, generator=gen, dtype=f64)
    exact = methods.get("cp").solve(wq, wk, heads, heads * dh)
    got = centred_content_bias(wq, bq, wk, heads, mu, exact, mu, None)
    torch.testing.assert_close(got, content_bias(wk, bq, heads), atol=1e-9, rtol=1e-7)


def test_the_norm_gain_is_the_square_of_how_much_the_layernorm_magnifies_an_error_at_each_token():
    """An error in a LayerNorm's input that it does not remove (no mean over the features, nothing along the centred
    input) comes out scaled by 1 / std at its token: the next layer feels it gain x |error|^2, so a token of twice the
    spread weighs a quarter."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 16, generator=gen, dtype=f64) * torch.tensor([1.0, 2.0, 0.5], dtype=f64)[None, :, None]
    tokens = torch.ones(2, 3, dtype=torch.bool)
    norm = torch.nn.LayerNorm(16, eps=1e-5, elementwise_affine=False).double()
    gain = norm_gain(s, tokens, norm.eps)
    for b in range(2):
        for t in range(3):
            centred = s[b, t] - s[b, t].mean()
            err = torch.randn(16, generator=gen, dtype=f64)
            err -= err.mean()
            err -= (err @ centred) / (centred @ centred) * centred  # what the LayerNorm keeps
            moved = norm(s[b, t] + 1e-6 * err) - norm(s[b, t])
            assert float(moved.pow(2).sum() / (1e-6 * err).pow(2).sum()) == pytest.approx(float(gain[b, t]), rel=1e-4)
    spread = s.var(-1, unbiased=False).float()  # (B, T)
    torch.testing.assert_close(gain[:, 1] / gain[:, 0], spread[:, 0] / spread[:, 1])


def test_a_near_constant_token_takes_no_more_than_a_hundred_times_the_mean_gain():
    s = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    s[0, 2] = 3.0  # constant: a LayerNorm maps it to its bias, whatever error it has
    gain = norm_gain(s, torch.ones(1, 4, dtype=torch.bool), 1e-12)
    floor = 1e-2 * s.var(-1, unbiased=False).mean()
    assert torch.isfinite(gain).all() and float(gain[0, 2]) == pytest.approx(1 / float(floor), rel=1e-5)


def test_rollout_follows_the_attention_maps_from_the_readout():
    """Two layers: the last layer's weights are the readout, the first's one rollout step back."""
    tokens = torch.tensor([[True, True, True]])
    move = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # token i attends to i+1
    readout = readout_weights(tokens, first_token=True)
    w = rollout([move, move], readout, tokens, residual=0.25)
    torch.testing.assert_close(w[1], torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(w[0], torch.tensor([[0.25, 0.75, 0.0]]))  # residual part, and on to the attended key
    torch.testing.assert_close(readout_weights(torch.tensor([[True, True, False]]), first_token=False),
                               torch.tensor([[0.5, 0.5, 0.0]]))


def test_rollout_steps_back_through_each_layers_own_map_and_is_zero_at_padding():
    """Three layers with different maps: layer l's weights are layer l+1's carried back through layer l+1's map,
    w_j <- r w_j + (1 - r) sum_i w_i M_ij, written out by index; the padding gets nothing, even from a readout and
    maps that put weight there."""
    gen = torch.Generator().manual_seed(6)
    tokens = torch.tensor([[True, True, True, False]])
    maps = [torch.rand(1, 4, 4, generator=gen, dtype=f64) for _ in range(3)]
    maps = [m / m.sum(-1, keepdim=True) for m in maps]  # rows that also attend to the padding key
    readout = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=f64)
    got = rollout(maps, readout, tokens, residual=0.3)
    want = [0.1, 0.2, 0.3, 0.0]
    for index in (2, 1, 0):
        torch.testing.assert_close(got[index], torch.tensor([want], dtype=f64))
        M = maps[index][0]
        want = [(0.3 * want[j] + 0.7 * sum(want[i] * float(M[i, j]) for i in range(4))) * (j < 3) for j in range(4)]


def test_rollout_keeps_half_of_each_step_on_the_residual_path_by_default():
    """The sequential reduction calls rollout with its default: half the weight stays, half follows the map."""
    tokens, swap = torch.tensor([[True, True]]), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    w = rollout([swap, swap], torch.tensor([[1.0, 0.0]]), tokens)
    torch.testing.assert_close(w[0], torch.tensor([[0.5, 0.5]]))


def test_the_head_weights_are_the_root_of_each_heads_share_over_the_mean_with_a_floor():
    """alpha_h = (share_h / mean share)^1/2, a head with no share (its W_O is zero) floored at 1e-3^1/2, not zero (the
    factors are divided by alpha)."""
    m = OutputMoments(2, 3)
    m.share += torch.tensor([1.0, 5.0, 0.0], dtype=f64)  # mean 2
    torch.testing.assert_close(m.head_weights(), torch.tensor([0.5, 2.5, 1e-3], dtype=f64).sqrt())


def test_the_ridge_map_is_least_squares_pulled_to_the_identity_by_a_scale_free_ridge():
    """P minimises ||X - X~ P^T||^2 / n + r ||P - I||^2, r = ridge x the mean eigenvalue of X~^T X~ / n: lstsq on the
    data rows stacked over sqrt(r) I rows. The ridge is relative: the same P for the data scaled by 1000."""
    gen = torch.Generator().manual_seed(8)
    n, d, ridge = 7, 4, 0.3
    xr, x = torch.randn(n, d, generator=gen, dtype=f64), torch.randn(n, d, generator=gen, dtype=f64)
    r = ridge * (xr * xr).sum() / n / d
    eye = torch.eye(d, dtype=f64)
    want = torch.linalg.lstsq(torch.cat([xr / n**0.5, r.sqrt() * eye]), torch.cat([x / n**0.5, r.sqrt() * eye])
                              ).solution.T
    for scale in (1.0, 1e3):
        xs, xrs = x * scale, xr * scale
        torch.testing.assert_close(ridge_map(xrs.T @ xrs / n, xs.T @ xrs / n, ridge), want)


def random_factors(method, d=6, heads=2, r=3, seed=9):
    """Truncated factors of any method, random (no solver structure to hide a swapped U and V), and their heads
    A_hat (H, d, d) rebuilt by the method's own formula."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    if method == "svd":  # A_h = U_h V_h^T
        f = Factors("svd", rand(heads, d, r), rand(heads, d, r), None, 0.0)
        return f, torch.einsum("hdr,her->hde", f.U, f.V)
    if method == "tucker":  # A_h = U G_h V^T, a non-square core
        f = Factors("tucker", rand(d, r), rand(d, r + 1), rand(heads, r, r + 1), 0.0)
        return f, torch.einsum("dr,hrs,es->hde", f.U, f.mixing, f.V)
    f = Factors("cp", rand(d, r), rand(d, r), rand(heads, r), 0.0)  # A_h = U diag(m_h) V^T
    return f, torch.einsum("dr,hr,er->hde", f.U, f.mixing, f.V)


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_the_key_side_is_the_reconstructed_heads_applied_to_the_query(method):
    f, dense = random_factors(method)
    mu = torch.randn(6, generator=torch.Generator().manual_seed(10), dtype=f64)
    torch.testing.assert_close(key_side(f, mu), torch.einsum("hde,d->he", dense, mu))


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_the_centred_bias_keeps_the_mean_query_exact_on_the_reduced_stream(method):
    """Off the identity: the reduced mean query mu_r differs from the original mu and keys are carried by a key map
    (y ~ Pk y~). For every reduced key y~, mu_r^T A_hat_h y~ + c_h . y~ is the original mean query's score
    (W_q^h mu + b_q^h) . W_k^h Pk y~, whatever the (truncated) factors."""
    d, heads, dh = 6, 2, 3
    gen = torch.Generator().manual_seed(11)
    wq, wk = torch.randn(heads * dh, d, generator=gen, dtype=f64), torch.randn(heads * dh, d, generator=gen, dtype=f64)
    bq, mu, mu_r = (torch.randn(n, generator=gen, dtype=f64) for n in (heads * dh, d, d))
    key_map, y = torch.randn(d, d, generator=gen, dtype=f64), torch.randn(d, 5, generator=gen, dtype=f64)
    f, dense = random_factors(method, d, heads)
    bias = centred_content_bias(wq, bq, wk, heads, mu, f, mu_r, key_map)
    reduced = torch.einsum("d,hde->he", mu_r, dense) @ y + bias @ y  # (H, 5)
    original = torch.einsum("hi,hid->hd", (wq @ mu + bq).view(heads, dh), wk.view(heads, dh, d)) @ key_map @ y
    torch.testing.assert_close(reduced, original)


def drifted(d=4, heads=2, seed=12):
    """Output moments of a reduced stream that has drifted from the original (x~ != x, its mean too), with padding,
    uneven token weights and a key metric S = R R^T zero at padding; and the data, flattened per batch."""
    gen = torch.Generator().manual_seed(seed)
    m, data = OutputMoments(d, heads), []
    tokens = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for _ in range(2):
        x = torch.randn(2, 5, d, generator=gen, dtype=f64) + 0.5
        xr = x @ torch.randn(d, d, generator=gen, dtype=f64) * 0.5 + 0.3 * torch.randn(2, 5, d, generator=gen,
                                                                                      dtype=f64) - 0.2
        weights = (torch.rand(2, 5, generator=gen, dtype=f64) + 0.5) * tokens
        R = torch.randn(2, 5, 5, generator=gen, dtype=f64) * tokens[..., None]
        m.add(x, xr, tokens, weights, R @ R.transpose(-1, -2), torch.tensor([1.0, 3.0], dtype=f64))
        data.append((x, xr, tokens, weights, R))
    return m, data


def test_the_output_moments_are_the_weighted_sums_of_both_streams():
    """Against sums written out token by token: the weighted means of x and x~, the centred query metric, the key
    metric Y~^T S Y~ per real token; the query map is the centred weighted least-squares map x - mu ~ Pq (x~ - mu~)
    and the key map the least-squares map y ~ Pk y~ in the S metric (rows R^T Y~ for S = R R^T), both with the
    ridge towards the identity: 1e-3 for the keys, QUERY_MAP_RIDGE x d / rows for the 16 query rows."""
    d = 4
    m, data = drifted(d)
    tok = [(x[b, j], xr[b, j], w[b, j]) for x, xr, tokens, w, _ in data for b in range(2) for j in range(5)
           if tokens[b, j]]  # (x_i, x~_i, w_i) of every real token
    n = sum(float(w) for _, _, w in tok)
    mu = sum(w * x for x, _, w in tok) / n
    mu_r = sum(w * xr for _, xr, w in tok) / n
    torch.testing.assert_close(m.means()[0], mu)
    torch.testing.assert_close(m.means()[1], mu_r)
    cq = sum(w * torch.outer(xr - mu_r, xr - mu_r) for _, xr, w in tok) / n
    torch.testing.assert_close(m.query_metric(), cq)
    n_key = len(tok)
    ck = sum(torch.outer(xr[b, i], xr[b, j]) * float((R[b] @ R[b].T)[i, j])
             for _, xr, _, _, R in data for b in range(2) for i in range(5) for j in range(5)) / n_key
    torch.testing.assert_close(m.key_metric(), ck)

    eye = torch.eye(d, dtype=f64)

    def ridge_lstsq(rows, targets, count, metric, ridge=1e-3):
        r = ridge * metric.trace() / d * count  # in sums rather than means
        return torch.linalg.lstsq(torch.cat([rows, r.sqrt() * eye]), torch.cat([targets, r.sqrt() * eye])).solution.T

    root = torch.tensor([float(w) ** 0.5 for _, _, w in tok], dtype=f64)[:, None]
    pq = ridge_lstsq(root * torch.stack([xr - mu_r for _, xr, _ in tok]),
                     root * torch.stack([x - mu for x, _, _ in tok]), n, cq, QUERY_MAP_RIDGE * d / len(tok))
    torch.testing.assert_close(m.query_map(), pq)
    key_rows = torch.cat([R[b].T @ xr[b] for _, xr, _, _, R in data for b in range(2)])  # R^T Y~
    key_targets = torch.cat([R[b].T @ x[b] for x, _, _, _, R in data for b in range(2)])  # R^T Y
    torch.testing.assert_close(m.key_map(), ridge_lstsq(key_rows, key_targets, n_key, ck))


def test_a_query_map_fitted_on_few_rows_is_pulled_to_the_identity_as_width_over_rows():
    """A classifier's last layer is queried at one token a sequence: 512 rows for MiniLM's 384-wide map. Where the
    streams differ by noise alone (the true map is the identity), the plain least-squares map fits that noise; the ridge
    QUERY_MAP_RIDGE x d / rows keeps the map near the truth. From QUERY_MAP_FEW_ROWS (10) rows a dimension on (every
    token of a few hundred sequences) the map is ridge_map's, with its 1e-3, as before."""
    gen = torch.Generator().manual_seed(5)
    d = 32

    def moments(rows, batch=40):
        m = OutputMoments(d, 2)
        for _ in range(rows // batch):
            x = torch.randn(1, batch, d, generator=gen, dtype=f64)
            xr = x + 0.5 * torch.randn(1, batch, d, generator=gen, dtype=f64)  # drift that no map explains
            tokens, weights = torch.ones(1, batch, dtype=torch.bool), torch.ones(1, batch, dtype=f64)
            m.add(x, xr, tokens, weights, torch.zeros(1, batch, batch, dtype=f64), torch.ones(2, dtype=f64))
        return m

    few = moments(40)
    mu_o, mu_r = few.means()
    plain = ridge_map(few.query_metric(), few.cross / few.n - torch.outer(mu_o, mu_r))  # the 1e-3 of every map
    eye = torch.eye(d, dtype=f64)
    # the population map is C (C + 0.25 I)^-1 = 0.8 I; plain least squares on 40 rows strays far from it
    assert (few.query_map() - 0.8 * eye).norm() < 0.7 * (plain - 0.8 * eye).norm()  # 2.59 against 4.54
    many = moments(QUERY_MAP_FEW_ROWS * d)  # rows enough: the plain map
    mu_o, mu_r = many.means()
    torch.testing.assert_close(many.query_map(), ridge_map(many.query_metric(),
                                                           many.cross / many.n - torch.outer(mu_o, mu_r)))


def test_off_the_identity_the_whitened_target_is_the_original_heads_carried_by_the_input_maps():
    """Once the streams differ, head h's target is Pq^T A_h Pk: the whitened, head-weighted weights mapped back
    (Cq^-1/2 ... Ck^-1/2, over alpha_h) give it, with the moments' query and key maps (which differ)."""
    d, heads, dh = 4, 2, 2
    m, _ = drifted(d, heads)
    gen = torch.Generator().manual_seed(13)
    wq, wk = torch.randn(heads * dh, d, generator=gen, dtype=f64), torch.randn(heads * dh, d, generator=gen, dtype=f64)
    wq_w, wk_w, inv_q, inv_k, alpha, key_map = whitened_problem(wq, wk, m, identity=False)
    pq, pk = m.query_map(), m.key_map()
    assert not torch.allclose(pq, pk, atol=1e-2)
    torch.testing.assert_close(key_map, pk)
    torch.testing.assert_close(alpha, m.head_weights())
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        got = inv_q @ wq_w[rows].T @ wk_w[rows] @ inv_k / alpha[h]
        torch.testing.assert_close(got, pq.T @ wq[rows].T @ wk[rows] @ pk)


def test_divergence_is_kl_half_squared_error_or_one_minus_cosine():
    p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    sp = p.softmax(-1)
    assert float(divergence(p, q, True)) == pytest.approx(float((sp * (sp.log() - torch.log(torch.tensor(0.5)))).sum()))
    assert float(divergence(torch.tensor([[3.0]]), torch.tensor([[1.0]]), True)) == pytest.approx(2.0)
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    assert float(divergence(e, torch.tensor([[1.0, 0.0]]), False)) == pytest.approx(1 - 2**-0.5)


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
@pytest.mark.parametrize("head", [False, True])
def test_the_readout_from_a_known_depth_is_the_models_readout(model_type, head):
    """The sensitivity runs the model from the measured layer up, the layers below replaced by their known output."""
    from mhacompress.reduction.sensitivity import _returns_tuple, readout, readout_from
    from mhacompress.reduction.sequential import layer_inputs, run_layer

    model, batch = tiny_model(model_type, head=head), padded_batch()
    with torch.no_grad():
        want = readout(model, batch)
        hidden, args, kwargs = layer_inputs(model, batch)
        calls, as_tuple = [], _returns_tuple(model, batch)
        layers(model)[0].register_forward_hook(lambda *a: calls.append(1))
        for index, layer in enumerate(layers(model)):
            calls.clear()
            torch.testing.assert_close(readout_from(model, index, hidden, batch, as_tuple), want)
            assert len(calls) == (index == 0)  # the layers below are not run again
            hidden = run_layer(layer, hidden, args, kwargs)
    assert all(not type(m).__name__.startswith("_Replay") for m in layers(model))


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
def test_a_classifiers_readout_runs_its_last_feed_forward_on_the_first_token_alone(model_type):
    """The head reads the first token of the last layer: the readout gives the whole model's logits, with the last
    layer's output one position long, and leaves no hook behind."""
    from mhacompress.reduction.sensitivity import readout

    model, batch = tiny_model(model_type, head=True), padded_batch()
    lengths = []
    layers(model)[-1].register_forward_hook(
        lambda module, args, out: lengths.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    with torch.no_grad():
        want = model(**batch).logits
        got = readout(model, batch)
        again = model(**batch).logits
    torch.testing.assert_close(got, want)
    assert lengths == [batch["input_ids"].shape[1], 1, batch["input_ids"].shape[1]]
    assert torch.equal(again, want)


@pytest.mark.parametrize("head", [False, True])
def test_measured_sensitivity_leaves_the_model_unchanged_and_is_zero_when_exact(head):
    model = tiny_model("bert", head=head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [padded_batch(lengths=(9, 4, 7, 1, 8, 6), seed=i) for i in range(3)]
    plan = Plan(compensate=True, first_token_last=head)
    curves = output_curves(model, ReductionConfig(key_dim=4), [2, 8, 32], batches, plan)
    assert len(curves) == 2 and all(c[32] == 0.0 and c[2] > 0 for c in curves)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, before[name]), name
    assert candidates(model, "svd", 8) == [4, 8, 12, 16]  # multiples of the 4 heads around 8


def test_mean_pooling_averages_the_real_tokens_only():
    from mhacompress.reduction.objectives import mean_pooled

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2), the last token is padding
    assert torch.equal(mean_pooled(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
