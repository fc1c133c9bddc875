"""Decompositions of a layer's per-head score products A_h = W_q^h^T W_k^h, never materialising T = (A_h)_h.

Pure tensor functions: weights in, factors out. They know nothing of nn.Module (see surgery.py for that).

Shapes: ``wq``, ``wk`` are HF ``nn.Linear`` weights of shape (H*dh, d); head h owns rows h*dh:(h+1)*dh. The tensor
they define is T (H, d, d) with T[h] = A_h. All three methods share one contract: ``rank`` (the key dim), ``init``,
``n_iter_max``, ``tol``, ``random_state``, and return factors with the relative Frobenius error ||T - T_hat|| / ||T||.
Everything is computed in float64: errors are differences of large norms and float32 would round them away.

The reference implementations are tensorly's ``parafac`` and ``partial_tucker`` on the dense tensor; tests compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class Factors:
    """A layer's decomposition. ``cp``: T[h] ~ U diag(M[h]) V^T; ``tucker``: T[h] ~ U G[h] V^T (G stored in
    ``mixing``); ``svd``: T[h] ~ U[h] V[h]^T with per-head U, V of shape (H, d, r)."""

    method: str
    U: Tensor
    V: Tensor
    mixing: Tensor | None
    relative_error: float
    n_iter: int = 0
    errors: list[float] = field(default_factory=list)  # relative error after each iteration


def _heads(w: Tensor, num_heads: int) -> Tensor:
    d_out, d = w.shape
    assert d_out % num_heads == 0, f"weight rows {d_out} are not a multiple of {num_heads} heads"
    return w.reshape(num_heads, d_out // num_heads, d)  # (H, dh, d)


def _check(wq: Tensor, wk: Tensor, num_heads: int, rank: int, max_rank: int) -> tuple[Tensor, Tensor]:
    assert wq.shape == wk.shape and wq.ndim == 2, f"wq {tuple(wq.shape)} and wk {tuple(wk.shape)} must match"
    assert 1 <= rank <= max_rank, f"rank must be in 1..{max_rank}, got {rank}"
    return wq.detach().to(torch.float64), wk.detach().to(torch.float64)


def score_tensor(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """The dense tensor T (H, d, d). For tests and the tensorly reference only: the solvers never build it."""
    return torch.einsum("hid,hie->hde", _heads(wq, num_heads), _heads(wk, num_heads))  # (H, d, d)


def score_norm2(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """||T||_F^2 = sum_h tr((W_q^h W_q^h^T)(W_k^h W_k^h^T)), from (H, dh, dh) Gram matrices."""
    gq = torch.einsum("hid,hjd->hij", _heads(wq, num_heads), _heads(wq, num_heads))  # (H, dh, dh)
    gk = torch.einsum("hid,hjd->hij", _heads(wk, num_heads), _heads(wk, num_heads))  # (H, dh, dh)
    return (gq * gk).sum()


def _mode_gram(w_left: Tensor, w_right: Tensor, num_heads: int) -> Tensor:
    """sum_h W_l^h^T (W_r^h W_r^h^T) W_l^h (d, d): the Gram matrix of T's unfolding on the ``w_left`` side."""
    wl, wr = _heads(w_left, num_heads), _heads(w_right, num_heads)  # (H, dh, d)
    g = torch.einsum("hid,hjd->hij", wr, wr)  # (H, dh, dh)
    return torch.einsum("hid,hij,hje->de", wl, g, wl)  # (d, d)


def _top_eigvecs(sym: Tensor, k: int) -> Tensor:
    """Leading k eigenvectors of a symmetric matrix, columns ordered by decreasing eigenvalue, signs fixed."""
    _, vecs = torch.linalg.eigh(sym)  # ascending
    vecs = vecs[:, -k:].flip(-1)  # (d, k)
    signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(k)])  # largest entry of each column positive
    return vecs * torch.where(signs == 0, 1.0, signs)


def _rel(err2: Tensor, norm2: Tensor) -> float:
    return float(err2.clamp_min(0).sqrt() / norm2.sqrt())


# ---- CP: collaborative heads ------------------------------------------------------------------------------


def cp_exact(wq: Tensor, wk: Tensor, num_heads: int) -> Factors:
    """The closed-form CP of rank H*dh: U = W_q^T, V = W_k^T, M = one-hot head blocks. Reproduces T exactly."""
    wq, wk = _check(wq, wk, num_heads, wq.shape[0], wq.shape[0])
    dh = wq.shape[0] // num_heads
    mixing = torch.eye(num_heads, dtype=torch.float64).repeat_interleave(dh, dim=1)  # (H, H*dh)
    return Factors("cp", wq.T.clone(), wk.T.clone(), mixing, 0.0)


def cp_init(wq: Tensor, wk: Tensor, num_heads: int, rank: int, init: str = "svd",
            random_state: int | None = 0) -> tuple[Tensor, Tensor]:
    """Initial U, V (d, rank). ``svd``: leading singular vectors of T's mode-1 and mode-2 unfoldings (tensorly's
    ``init='svd'``). ``random``: standard normal, from a seeded generator."""
    wq, wk = _check(wq, wk, num_heads, rank, wq.shape[1])
    d = wq.shape[1]
    if init == "svd":
        return _top_eigvecs(_mode_gram(wq, wk, num_heads), rank), _top_eigvecs(_mode_gram(wk, wq, num_heads), rank)
    if init == "random":
        gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
        return (torch.randn(d, rank, generator=gen, dtype=torch.float64),
                torch.randn(d, rank, generator=gen, dtype=torch.float64))
    raise ValueError(f"init must be 'svd' or 'random', got {init!r}")


def _solve_right(gram: Tensor, rhs: Tensor) -> Tensor:
    """X with X @ gram = rhs for a symmetric PSD gram (R, R): the ALS least-squares step (tensorly:
    solve(pinv.T, mttkrp.T).T), by Cholesky; a singular gram (a dead component) gets the minimum-norm solution."""
    rhs = rhs.to(gram.dtype)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def cp_als(wq: Tensor, wk: Tensor, num_heads: int, rank: int, *, n_iter_max: int = 100, tol: float = 1e-5,
           init: str | tuple[Tensor, Tensor] = "svd", random_state: int | None = 0,
           compute_dtype: torch.dtype = torch.float32) -> Factors:
    """Rank-``rank`` CP of T by alternating least squares, structured: each sweep costs four (d, d) x (d, rank)
    products instead of touching the (H, d, d) tensor.

    Updates the modes in tensorly's order (mixing M, then U, then V), so from the same initial factors it follows
    tensorly ``parafac`` iterate for iterate. ``init`` is ``"svd"``, ``"random"`` or explicit ``(U, V)``; M starts at
    its least-squares optimum. Stops when the relative error changes by less than ``tol`` between sweeps.
    At rank H*dh the closed form (``cp_exact``) is returned: it is exact, ALS is not.

    The four big products run in ``compute_dtype`` (float32: twice as fast on CPU); Gram matrices, solves and the
    returned error stay in float64. Pass ``torch.float64`` to follow tensorly to the last digit.
    """
    d_out = wq.shape[0]
    wq, wk = _check(wq, wk, num_heads, rank, d_out)
    if rank == d_out and not isinstance(init, tuple):
        return cp_exact(wq, wk, num_heads)
    H, dh = num_heads, d_out // num_heads
    U, V = init if isinstance(init, tuple) else cp_init(wq, wk, num_heads, rank, init, random_state)
    U, V = U.to(torch.float64).clone(), V.to(torch.float64).clone()
    norm2 = score_norm2(wq, wk, H)
    wq_c, wk_c = wq.to(compute_dtype), wk.to(compute_dtype)

    def heads_times(w: Tensor, x: Tensor) -> Tensor:  # (d_out, d) @ (d, R) -> (H, dh, R) in float64
        return (w @ x.to(compute_dtype)).to(torch.float64).view(H, dh, rank)

    def transpose_times(w: Tensor, x: Tensor) -> Tensor:  # (d_out, d)^T @ (H, dh, R) -> (d, R) in float64
        return (w.T @ x.reshape(d_out, rank).to(compute_dtype)).to(torch.float64)

    def gram(x: Tensor) -> Tensor:  # x^T x (R, R) in float64
        x = x.to(compute_dtype)
        return (x.T @ x).to(torch.float64)

    P, Q = heads_times(wq_c, U), heads_times(wk_c, V)  # W_q^h u_r, W_k^h v_r   (H, dh, R)
    UtU, VtV = gram(U), gram(V)
    errors: list[float] = []
    M = _solve_right(UtU * VtV, (P * Q).sum(1)) if n_iter_max == 0 else None  # no sweep: best M for U, V
    for _ in range(n_iter_max):
        # mode 0 (heads): M[h, r] = least squares against u_r^T A_h v_r
        M = _solve_right(UtU * VtV, (P * Q).sum(1))  # (H, R)
        MtM = M.T @ M
        # mode 1: sum_h A_h V diag(m_h) = W_q^T [W_k^h V diag(m_h)]_h
        U = _solve_right(MtM * VtV, transpose_times(wq_c, Q * M[:, None, :]))  # (d, R)
        P, UtU = heads_times(wq_c, U), gram(U)
        # mode 2: sum_h A_h^T U diag(m_h) = W_k^T [W_q^h U diag(m_h)]_h
        lhs = MtM * UtU  # (R, R)
        mttkrp = transpose_times(wk_c, P * M[:, None, :])  # (d, R)
        V = _solve_right(lhs, mttkrp)
        Q, VtV = heads_times(wk_c, V), gram(V)
        # ||T - T_hat||^2 = ||T||^2 - 2 <T, T_hat> + ||T_hat||^2, both from the last mode's products
        errors.append(_rel(norm2 - 2 * (mttkrp * V).sum() + (lhs * VtV).sum(), norm2))
        if tol and len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return Factors("cp", U, V, M, cp_relative_error(wq, wk, H, U, V, M), len(errors), errors)


def cp_relative_error(wq: Tensor, wk: Tensor, num_heads: int, U: Tensor, V: Tensor, M: Tensor) -> float:
    """||T - [[M, U, V]]|| / ||T|| without building T."""
    wq, wk = wq.to(torch.float64), wk.to(torch.float64)
    H, dh, rank = num_heads, wq.shape[0] // num_heads, U.shape[1]
    P, Q = (wq @ U).view(H, dh, rank), (wk @ V).view(H, dh, rank)  # (H, dh, R)
    inner = ((P * Q).sum(1) * M).sum()
    norm2 = score_norm2(wq, wk, H)
    return _rel(norm2 - 2 * inner + ((M.T @ M) * (U.T @ U) * (V.T @ V)).sum(), norm2)


# ---- Tucker-2: shared U, V, a full core per head -----------------------------------------------------------


def tucker2(wq: Tensor, wk: Tensor, num_heads: int, rank: int, *, n_iter_max: int = 30, tol: float = 1e-7,
            init: str = "svd", random_state: int | None = 0) -> Factors:
    """T[h] ~ U G[h] V^T with orthonormal U, V (d, rank) and core G (H, rank, rank), by higher-order orthogonal
    iteration on the two d-modes (tensorly ``partial_tucker(T, [rank, rank], modes=[1, 2])``), structured."""
    d_out, d = wq.shape
    wq, wk = _check(wq, wk, num_heads, rank, d)
    H, dh = num_heads, d_out // num_heads
    U, V = cp_init(wq, wk, H, rank, init, random_state)
    if init == "random":
        U, V = torch.linalg.qr(U)[0], torch.linalg.qr(V)[0]
    norm2 = score_norm2(wq, wk, H)
    errors: list[float] = []
    for _ in range(n_iter_max):
        U = _top_eigvecs(_projected_gram(wq, (wk @ V).view(H, dh, rank)), rank)  # sum_h A_h V V^T A_h^T
        P = (wq @ U).view(H, dh, rank)  # (H, dh, R)
        V = _top_eigvecs(_projected_gram(wk, P), rank)  # sum_h A_h^T U U^T A_h
        G = torch.einsum("hir,his->hrs", P, (wk @ V).view(H, dh, rank))  # U^T A_h V   (H, R, R)
        errors.append(_rel(norm2 - (G**2).sum(), norm2))  # U, V orthonormal: ||T - T_hat||^2 = ||T||^2 - ||G||^2
        if tol and len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    G = torch.einsum("hir,his->hrs", (wq @ U).view(H, dh, rank), (wk @ V).view(H, dh, rank))
    return Factors("tucker", U, V, G, _rel(norm2 - (G**2).sum(), norm2), len(errors), errors)


def _projected_gram(w: Tensor, proj: Tensor) -> Tensor:
    """sum_h W^h^T (proj_h proj_h^T) W^h (d, d), for proj (H, dh, R) = the other side already projected."""
    H = proj.shape[0]
    g = torch.einsum("hir,hjr->hij", proj, proj)  # (H, dh, dh)
    wh = _heads(w, H)  # (H, dh, d)
    return torch.einsum("hid,hij,hje->de", wh, g, wh)


# ---- per-head truncated SVD: the baseline that shrinks heads instead of sharing ----------------------------


def head_cores(wq: Tensor, wk: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A_h = Qq[h] C[h] Qk[h]^T with thin QRs of the (d, dh) factors W_q^h^T = Qq Rq, W_k^h^T = Qk Rk and the
    (dh, dh) core C = Rq Rk^T: A_h's singular values are C[h]'s, for an SVD of a (dh, dh) matrix only.
    Returns Qq (H, d, dh), C (H, dh, dh), Qk (H, d, dh) in the dtype of the weights."""
    qq, rq = torch.linalg.qr(_heads(wq, num_heads).transpose(1, 2))  # (H, d, dh), (H, dh, dh)
    qk, rk = torch.linalg.qr(_heads(wk, num_heads).transpose(1, 2))
    return qq, rq @ rk.transpose(1, 2), qk


def head_svd(wq: Tensor, wk: Tensor, num_heads: int, rank: int) -> Factors:
    """Best rank-``rank // H`` approximation of every A_h separately (Eckart-Young), singular values folded into U.

    ``rank`` is the total key dim, split evenly over heads, so the Q/K parameter count matches CP's at the same rank.
    Returns U, V of shape (H, d, r).
    """
    d_out, d = wq.shape
    wq, wk = _check(wq, wk, num_heads, rank, d_out)
    H = num_heads
    assert rank % H == 0, f"svd rank {rank} must be a multiple of {H} heads"
    r = rank // H
    qq, core, qk = head_cores(wq, wk, H)
    x, s, yt = torch.linalg.svd(core)  # (H, dh, dh), (H, dh), (H, dh, dh)
    U = qq @ (x[:, :, :r] * s[:, None, :r])  # (H, d, r)
    V = qk @ yt[:, :r, :].transpose(1, 2)  # (H, d, r)
    norm2 = (s**2).sum()
    return Factors("svd", U, V, None, _rel((s[:, r:] ** 2).sum(), norm2))


def relative_error(wq: Tensor, wk: Tensor, num_heads: int, factors: Factors) -> float:
    """||T - T_hat|| / ||T|| for factors of any method, without building T (for factors mapped back from a whitened
    problem, whose own ``relative_error`` is measured in the whitened space)."""
    if factors.method == "cp":
        return cp_relative_error(wq, wk, num_heads, factors.U, factors.V, factors.mixing)
    wq, wk = _heads(wq.to(torch.float64), num_heads), _heads(wk.to(torch.float64), num_heads)  # (H, dh, d)
    U, V = factors.U.to(torch.float64), factors.V.to(torch.float64)
    if factors.method == "svd":  # per-head U, V (H, d, r): T_hat[h] = U[h] V[h]^T
        P, Q = wq @ U, wk @ V  # (H, dh, r)
        inner = (P * Q).sum()
        norm_hat = (U.transpose(1, 2) @ U * (V.transpose(1, 2) @ V)).sum()  # sum_h tr(UtU_h VtV_h)
    else:  # tucker: T_hat[h] = U G[h] V^T
        G = factors.mixing.to(torch.float64)  # (H, R, R)
        P, Q = (wq @ U), (wk @ V)  # (H, dh, R)
        inner = torch.einsum("hir,hrs,his->", P, G, Q)
        norm_hat = (G.transpose(1, 2) @ (U.T @ U) @ G * (V.T @ V)).sum()  # sum_h tr(G^T UtU G VtV)
    norm2 = score_norm2(wq.flatten(0, 1), wk.flatten(0, 1), num_heads)
    return _rel(norm2 - 2 * inner + norm_hat, norm2)


def decompose(wq: Tensor, wk: Tensor, num_heads: int, rank: int, method: str = "cp", **options) -> Factors:
    """Dispatch on ``method``: ``cp`` (cp_als), ``tucker`` (tucker2) or ``svd`` (head_svd)."""
    if method == "cp":
        return cp_als(wq, wk, num_heads, rank, **options)
    if method == "tucker":
        return tucker2(wq, wk, num_heads, rank, **options)
    if method == "svd":
        return head_svd(wq, wk, num_heads, rank)
    raise ValueError(f"method must be one of cp, tucker, svd; got {method!r}")
