"""Decompositions of a layer's per-head score products A_h = W_q^h^T W_k^h, never materialising T = (A_h)_h.

Pure tensor functions: weights in, factors out. They know nothing of nn.Module (see surgery.py for that).

Shapes: ``wq``, ``wk`` are HF ``nn.Linear`` weights of shape (H*dh, d); head h owns rows h*dh:(h+1)*dh. The tensor
they define is T (H, d, d) with T[h] = A_h. All three methods share one contract: ``rank`` (the key dim), ``init``,
``n_iter_max``, ``tol``, ``random_state``, and return factors with the relative Frobenius error ||T - T_hat|| / ||T||.
Errors, solves and eigendecompositions are computed in float64: errors are differences of large norms and float32
would round them away; cp's large products run in float32 (``compute_dtype``).

Where they run: on the device of ``wq`` (CUDA included), except MPS, which has no float64: there on the CPU, and the
factors come back on the CPU. Random initialisations draw from a seeded CPU generator, so a seed gives the same
start on every device. On the CPU every solver runs single-threaded (robust on shared machines, see devices.py);
``decompose_layers`` solves several layers at once, one per core.

The reference implementations are tensorly's ``parafac`` and ``partial_tucker`` on the dense tensor (the 2020
paper's procedure, ``solver="tensorly"``); tests compare.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..devices import cpu_threads, parallel_map, work_device
from ..errors import UsageError, given, named

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
    """The weights as float64 on the work device, after checking shapes and rank."""
    assert wq.shape == wk.shape and wq.ndim == 2, f"wq {tuple(wq.shape)} and wk {tuple(wk.shape)} must match"
    assert 1 <= rank <= max_rank, f"rank must be in 1..{max_rank}, got {rank}"
    return _float64(wq, wk)


def _float64(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as float64 on the work device of the first (the CPU for MPS inputs)."""
    device = work_device(tensors[0].device)
    return tuple(t.detach().to(device, torch.float64) for t in tensors)


def _single_threaded(solver: Callable[..., "Factors"]) -> Callable[..., "Factors"]:
    """Run ``solver`` with one intra-op CPU thread: its many small ops would otherwise wait at OpenMP barriers
    whenever another process holds a core (devices.py). Parallelism comes from solving layers concurrently."""
    @functools.wraps(solver)
    def run(*args, **kwargs):
        with cpu_threads(1):
            return solver(*args, **kwargs)
    return run


def score_tensor(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """The dense tensor T (H, d, d). For tests and the tensorly reference only: the solvers never build it."""
    return torch.einsum("hid,hie->hde", _heads(wq, num_heads), _heads(wk, num_heads))  # (H, d, d)


def score_norm2(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """||T||_F^2 = sum_h tr((W_q^h W_q^h^T)(W_k^h W_k^h^T)), from (H, dh, dh) Gram matrices."""
    gq = torch.einsum("hid,hjd->hij", _heads(wq, num_heads), _heads(wq, num_heads))  # (H, dh, dh)
    gk = torch.einsum("hid,hjd->hij", _heads(wk, num_heads), _heads(wk, num_heads))  # (H, dh, dh)
    return (gq * gk).sum()


def mode_gram(w_left: Tensor, w_right: Tensor, num_heads: int) -> Tensor:
    """sum_h W_l^h^T (W_r^h W_r^h^T) W_l^h (d, d): the Gram matrix of T's unfolding on the ``w_left`` side."""
    return _projected_gram(w_left, _heads(w_right, num_heads))


def _top_eigvecs(sym: Tensor, k: int) -> Tensor:
    """Leading k eigenvectors of a symmetric matrix, columns ordered by decreasing eigenvalue, signs fixed."""
    _, vecs = torch.linalg.eigh(sym)  # ascending
    vecs = vecs[:, -k:].flip(-1)  # (d, k)
    columns = torch.arange(k, device=vecs.device)
    signs = torch.sign(vecs[vecs.abs().argmax(0), columns])  # largest entry of each column positive
    return vecs * torch.where(signs == 0, 1.0, signs)


def _rel(err2: Tensor, norm2: Tensor) -> float:
    if not norm2 and not err2.clamp_min(0):  # a layer whose scores are all zero (W_q or W_k = 0), reproduced exactly
        return 0.0
    return float(err2.clamp_min(0).sqrt() / norm2.sqrt())


# ---- CP: collaborative heads ------------------------------------------------------------------------------


def cp_exact(wq: Tensor, wk: Tensor, num_heads: int) -> Factors:
    """The closed-form CP of rank H*dh: U = W_q^T, V = W_k^T, M = one-hot head blocks. Reproduces T exactly."""
    wq, wk = _check(wq, wk, num_heads, wq.shape[0], wq.shape[0])
    dh = wq.shape[0] // num_heads
    mixing = torch.eye(num_heads, dtype=torch.float64, device=wq.device).repeat_interleave(dh, dim=1)  # (H, H*dh)
    return Factors("cp", wq.T.clone(), wk.T.clone(), mixing, 0.0)


@_single_threaded
def cp_init(wq: Tensor, wk: Tensor, num_heads: int, rank: int, init: str = "svd",
            random_state: int | None = 0) -> tuple[Tensor, Tensor]:
    """Initial U, V (d, rank), float64 on the work device. ``svd``: leading singular vectors of T's mode-1 and
    mode-2 unfoldings (tensorly's ``init='svd'``). ``random``: standard normal, from a seeded CPU generator (the
    same numbers on every device)."""
    wq, wk = _check(wq, wk, num_heads, rank, wq.shape[1])
    d = wq.shape[1]
    if init == "svd":
        return _top_eigvecs(mode_gram(wq, wk, num_heads), rank), _top_eigvecs(mode_gram(wk, wq, num_heads), rank)
    if init == "random":
        gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
        return (torch.randn(d, rank, generator=gen, dtype=torch.float64).to(wq.device),
                torch.randn(d, rank, generator=gen, dtype=torch.float64).to(wq.device))
    raise ValueError(f"init must be 'svd' or 'random', got {init!r}")


def _inverse(gram: Tensor) -> Tensor:
    """The inverse of a symmetric PSD gram (R, R), by Cholesky; a singular gram (a dead component) gets the
    pseudo-inverse, so that ``rhs @ _inverse(gram)`` is the minimum-norm least-squares step. A non-finite gram (a
    float32 run that broke down) gets NaN, which reaches the sweep's error: cp_als then redoes the run in float64."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    if not torch.isfinite(gram).all():  # pinv would raise a LinAlgError
        return torch.full_like(gram, float("nan"))
    return torch.linalg.pinv(gram, hermitian=True)


def _solve_right(gram: Tensor, rhs: Tensor) -> Tensor:
    """X with X @ gram = rhs: the ALS least-squares step (tensorly: solve(pinv.T, mttkrp.T).T)."""
    return rhs.to(gram.dtype) @ _inverse(gram)


@dataclass
class _HalfStep:
    """One factor's least-squares update F = W^T X S^-1, kept implicit: W F, F^T F and <W^T X, F> come from the
    head-row Gram G = W W^T (n, n) with one (n, n) x (n, R) product, instead of two (n, d) x (d, R) ones."""

    WF: Tensor  # (n, R) in the compute dtype: W F, the next mode's input
    FtF: Tensor  # (R, R) float64
    inner: Tensor  # () float64: <W^T X, F> = tr(X^T G X S^-1)
    S_inv: Tensor  # (R, R) float64, to form F = (W^T X) S^-1 once at the end


def _half_step(gram_w: Tensor, X: Tensor, S: Tensor) -> _HalfStep:
    """The update for X (n, R) and the system S (R, R), with gram_w and X in the compute dtype."""
    S_inv = _inverse(S)  # (R, R)
    Z = gram_w @ X  # W W^T X   (n, R)
    A = (X.T @ Z).to(torch.float64) @ S_inv  # X^T G X S^-1 = mttkrp^T mttkrp S^-1   (R, R)
    FtF = S_inv @ A  # S^-1 X^T G X S^-1   (R, R)
    # S^-1 is applied in float64: rounded to float32 it moved converged errors 13x further from the float64 run
    WF = (Z.to(torch.float64) @ S_inv).to(Z.dtype)  # (n, R)
    return _HalfStep(WF, (FtF + FtF.T) / 2, A.diagonal().sum(), S_inv)


@_single_threaded
def cp_als(wq: Tensor, wk: Tensor, num_heads: int, rank: int, *, n_iter_max: int = 100, tol: float = 1e-5,
           init: str | tuple[Tensor, Tensor] = "svd", random_state: int | None = 0,
           compute_dtype: torch.dtype = torch.float32) -> Factors:
    """Rank-``rank`` CP of T by alternating least squares, structured: T is never built, and U, V are never formed
    inside the loop. Each sweep costs two (n, n) x (n, rank) products with the head-row Gram matrices
    W_q W_q^T and W_k W_k^T (n = H*dh), a few (n, rank) x (rank, rank) ones and (rank, rank) algebra.

    Updates the modes in tensorly's order (mixing M, then U, then V), so from the same initial factors it follows
    tensorly ``parafac`` iterate for iterate. ``init`` is ``"svd"``, ``"random"`` or explicit ``(U, V)``; M starts at
    its least-squares optimum. Stops when the relative error changes by less than ``tol`` between sweeps.
    At rank H*dh the closed form (``cp_exact``) is returned: it is exact, ALS is not.

    The (n, .) products run in ``compute_dtype`` (float32: twice as fast on CPU); the (rank, rank) Gram matrices,
    their inverses, the returned factors and errors are float64. Pass ``torch.float64`` to follow tensorly to the
    last digit. A float32 run that breaks down (non-finite errors: badly conditioned whitened weights from very
    anisotropic calibration data) is redone in float64 from the same start.
    """
    n = wq.shape[0]
    original = (wq, wk)
    wq, wk = _check(wq, wk, num_heads, rank, n)
    if rank == n and not isinstance(init, tuple):
        return cp_exact(wq, wk, num_heads)
    H, dh = num_heads, n // num_heads
    U, V = init if isinstance(init, tuple) else cp_init(wq, wk, num_heads, rank, init, random_state)
    U, V = U.to(wq), V.to(wq)  # float64 on the work device
    norm2 = score_norm2(wq, wk, H)
    wq_c, wk_c = wq.to(compute_dtype), wk.to(compute_dtype)
    gram_q, gram_k = wq_c @ wq_c.T, wk_c @ wk_c.T  # (n, n) each

    def by_mixing(x: Tensor, M: Tensor) -> Tensor:  # row block h of x (n, R) times diag(m_h)
        return (x.view(H, dh, rank) * M.to(x.dtype)[:, None, :]).view(n, rank)

    def mixing_rhs(P: Tensor, Q: Tensor) -> Tensor:  # u_r^T A_h v_r = sum over head rows of P * Q   (H, R)
        return (P * Q).view(H, dh, rank).sum(1).to(torch.float64)

    P, Q = wq_c @ U.to(compute_dtype), wk_c @ V.to(compute_dtype)  # W_q U, W_k V   (n, R)
    UtU, VtV = U.T @ U, V.T @ V
    M = _solve_right(UtU * VtV, mixing_rhs(P, Q))  # best M for the initial U, V   (H, R)
    errors: list[float] = []
    for sweep in range(n_iter_max):
        # mode 0 (heads): M[h, r] = least squares against u_r^T A_h v_r
        if sweep:
            M = _solve_right(UtU * VtV, mixing_rhs(P, Q))  # (H, R)
        MtM = M.T @ M
        # mode 1: U = sum_h A_h V diag(m_h) (MtM * VtV)^-1 = W_q^T X S^-1 with X = [W_k^h V diag(m_h)]_h
        X = by_mixing(Q, M)
        mode1 = _half_step(gram_q, X, MtM * VtV)
        P, UtU = mode1.WF, mode1.FtF
        # mode 2: V = W_k^T Y (MtM * UtU)^-1 with Y = [W_q^h U diag(m_h)]_h
        Y, lhs = by_mixing(P, M), MtM * UtU
        mode2 = _half_step(gram_k, Y, lhs)
        Q, VtV = mode2.WF, mode2.FtF
        # ||T - T_hat||^2 = ||T||^2 - 2 <T, T_hat> + ||T_hat||^2, both from the last mode's products
        errors.append(_rel(norm2 - 2 * mode2.inner + (lhs * VtV).sum(), norm2))
        if not math.isfinite(errors[-1]):
            if compute_dtype == torch.float64:
                if not (torch.isfinite(wq).all() and torch.isfinite(wk).all()):
                    raise NonFiniteProblem("the cp solver was given NaN or infinite values to decompose")
                raise FloatingPointError(f"the cp solver broke down at sweep {sweep + 1}: its error is not finite, "
                                         f"even in float64 (weights too large or too badly conditioned)")
            return cp_als(*original, num_heads, rank, n_iter_max=n_iter_max, tol=tol, init=init,
                          random_state=random_state, compute_dtype=torch.float64)
        if tol and len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    if errors:  # form the factors once, from the last sweep's least-squares systems
        U = (wq_c.T @ X).to(torch.float64) @ mode1.S_inv  # (d, R)
        V = (wk_c.T @ Y).to(torch.float64) @ mode2.S_inv
    return Factors("cp", U, V, M, cp_relative_error(wq, wk, H, U, V, M), len(errors), errors)


class NonFiniteProblem(FloatingPointError):
    """cp_als was handed NaN or infinite values (weights, or statistics of activations that overflowed): no solver
    setting can help."""


def breakdown_fix() -> str:
    """What to try when cp_als breaks down: the svd start is the same on every run, a random one is not; a larger key
    dim is an easier problem. In the caller's terms: the command's options, or a Python call's arguments."""
    return (f"pass {given('--init', 'random')} (with another {named('--seed')} if it breaks down again) or a larger "
            f"key dim")


def non_finite_fix() -> str:
    return ("the model's weights or its activations on the calibration data overflow: check the checkpoint "
            f"(mhacompress eval scores it), or pass {named('--weights-only', 'weights_only=True')}")


@contextmanager
def solving_layer(index: int, key_dim: int | None = None, fix: str | None = None):
    """A solver breakdown (cp_als's FloatingPointError) in layer ``index`` as a one-line UsageError that names the
    layer (and ``key_dim``) and ``fix`` (default ``breakdown_fix()``; for a problem that is not finite, what to check
    instead)."""
    try:
        yield
    except FloatingPointError as err:
        at = f"layer {index}" + (f" (key dim {key_dim})" if key_dim is not None else "")
        advice = non_finite_fix() if isinstance(err, NonFiniteProblem) else fix or breakdown_fix()
        raise UsageError(f"{at}: {err}; {advice}") from None


def cp_relative_error(wq: Tensor, wk: Tensor, num_heads: int, U: Tensor, V: Tensor, M: Tensor) -> float:
    """||T - [[M, U, V]]|| / ||T|| without building T."""
    wq, wk, U, V, M = _float64(wq, wk, U, V, M)
    H, dh, rank = num_heads, wq.shape[0] // num_heads, U.shape[1]
    P, Q = (wq @ U).view(H, dh, rank), (wk @ V).view(H, dh, rank)  # (H, dh, R)
    inner = ((P * Q).sum(1) * M).sum()
    norm2 = score_norm2(wq, wk, H)
    return _rel(norm2 - 2 * inner + ((M.T @ M) * (U.T @ U) * (V.T @ V)).sum(), norm2)


# ---- Tucker-2: shared U, V, a full core per head -----------------------------------------------------------


@_single_threaded
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
    wh = _heads(w, proj.shape[0])  # (H, dh, d)
    g = proj @ proj.transpose(1, 2)  # (H, dh, dh)
    return wh.flatten(0, 1).T @ (g @ wh).flatten(0, 1)  # (d, H*dh) @ (H*dh, d)


# ---- per-head truncated SVD: the baseline that shrinks heads instead of sharing ----------------------------


def head_cores(wq: Tensor, wk: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A_h = Qq[h] C[h] Qk[h]^T with thin QRs of the (d, dh) factors W_q^h^T = Qq Rq, W_k^h^T = Qk Rk and the
    (dh, dh) core C = Rq Rk^T: A_h's singular values are C[h]'s, for an SVD of a (dh, dh) matrix only.
    Returns Qq (H, d, dh), C (H, dh, dh), Qk (H, d, dh) in the dtype of the weights."""
    qq, rq = torch.linalg.qr(_heads(wq, num_heads).transpose(1, 2))  # (H, d, dh), (H, dh, dh)
    qk, rk = torch.linalg.qr(_heads(wk, num_heads).transpose(1, 2))
    return qq, rq @ rk.transpose(1, 2), qk


@_single_threaded
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
    wq, wk, U, V = _float64(wq, wk, factors.U, factors.V)
    wq, wk = _heads(wq, num_heads), _heads(wk, num_heads)  # (H, dh, d)
    if factors.method == "svd":  # per-head U, V (H, d, r): T_hat[h] = U[h] V[h]^T
        P, Q = wq @ U, wk @ V  # (H, dh, r)
        inner = (P * Q).sum()
        norm_hat = (U.transpose(1, 2) @ U * (V.transpose(1, 2) @ V)).sum()  # sum_h tr(UtU_h VtV_h)
    else:  # tucker: T_hat[h] = U G[h] V^T
        G = factors.mixing.to(U)  # (H, R, R)
        P, Q = (wq @ U), (wk @ V)  # (H, dh, R)
        inner = torch.einsum("hir,hrs,his->", P, G, Q)
        norm_hat = (G.transpose(1, 2) @ (U.T @ U) @ G * (V.T @ V)).sum()  # sum_h tr(G^T UtU G VtV)
    norm2 = score_norm2(wq.flatten(0, 1), wk.flatten(0, 1), num_heads)
    return _rel(norm2 - 2 * inner + norm_hat, norm2)


# ---- the tensorly reference: the 2020 paper's procedure, on the dense tensor --------------------------------


@contextmanager
def _tensorly_torch():
    """tensorly with its pytorch backend, for this thread only (tensors stay on their device)."""
    import tensorly as tl

    before = tl.get_backend()
    tl.set_backend("pytorch", local_threadsafe=True)
    try:
        yield tl
    finally:
        tl.set_backend(before, local_threadsafe=True)


@_single_threaded
def cp_tensorly(wq: Tensor, wk: Tensor, num_heads: int, rank: int, *, n_iter_max: int = 100, tol: float = 1e-5,
                init: str | tuple[Tensor, Tensor] = "svd", random_state: int | None = 0) -> Factors:
    """tensorly ``parafac`` on the dense T (H, d, d), float64: the reference for ``cp_als`` (H*d^2*rank work per
    sweep instead of (H*dh)^2*rank). ``init="random"`` is tensorly's own seeded random start, the 2020 paper's
    setting; ``"svd"`` or explicit ``(U, V)`` start where ``cp_als`` does (M at its least-squares optimum), so
    both follow the same iterates. Stops like ``cp_als`` (tensorly's absolute error change below ``tol``). At rank
    H*dh the closed form (``cp_exact``), as ``cp_als`` gives: ALS from any start stops short of exact (relative
    error 0.03 to 0.07 on a tiny BERT), and a full-key-dim reduction must reproduce the original."""
    wq, wk = _check(wq, wk, num_heads, rank, wq.shape[0])
    if rank == wq.shape[0] and not isinstance(init, tuple):
        return cp_exact(wq, wk, num_heads)
    T = score_tensor(wq, wk, num_heads)  # (H, d, d)
    start = init if init == "random" else _cp_start(wq, wk, num_heads, rank, init, random_state)
    with _tensorly_torch():
        from tensorly.decomposition import parafac

        cp, errors = parafac(T, rank, n_iter_max=n_iter_max, tol=tol, init=start, return_errors=True,
                             random_state=random_state, svd="truncated_svd")
    M, U, V = cp.factors
    M = M * cp.weights  # (H, R): tensorly's weights stay ones without normalisation; fold them in anyway
    errors = [float(e) for e in errors]
    return Factors("cp", U, V, M, cp_relative_error(wq, wk, num_heads, U, V, M), len(errors), errors)


def _cp_start(wq: Tensor, wk: Tensor, num_heads: int, rank: int, init, random_state):
    """(weights, [M, U, V]) for tensorly: cp_als's initial U, V and the least-squares M for them."""
    from tensorly.cp_tensor import CPTensor

    U, V = init if isinstance(init, tuple) else cp_init(wq, wk, num_heads, rank, init, random_state)
    U, V = U.to(wq), V.to(wq)
    H, dh = num_heads, wq.shape[0] // num_heads
    rhs = ((wq @ U) * (wk @ V)).view(H, dh, rank).sum(1)  # u_r^T A_h v_r   (H, R)
    M = _solve_right((U.T @ U) * (V.T @ V), rhs)
    return CPTensor((torch.ones(rank, dtype=wq.dtype, device=wq.device), [M, U, V]))


@_single_threaded
def tucker_tensorly(wq: Tensor, wk: Tensor, num_heads: int, rank: int, *, n_iter_max: int = 30, tol: float = 1e-7,
                    init: str = "svd", random_state: int | None = 0) -> Factors:
    """tensorly ``partial_tucker(T, [rank, rank], modes=[1, 2])`` on the dense T, float64: the reference for
    ``tucker2`` (same HOOI, same SVD start; ``init="random"`` is tensorly's own random start)."""
    d_out, d = wq.shape
    wq, wk = _check(wq, wk, num_heads, rank, d)
    T = score_tensor(wq, wk, num_heads)  # (H, d, d)
    with _tensorly_torch():
        from tensorly.decomposition import partial_tucker

        (core, (U, V)), errors = partial_tucker(T, [rank, rank], modes=[1, 2], n_iter_max=n_iter_max, tol=tol,
                                                init=init, random_state=random_state)
    errors = [float(e) for e in errors]
    factors = Factors("tucker", U, V, core, 0.0, len(errors), errors)
    factors.relative_error = relative_error(wq, wk, num_heads, factors)
    return factors


@_single_threaded
def svd_tensorly(wq: Tensor, wk: Tensor, num_heads: int, rank: int) -> Factors:
    """tensorly's truncated SVD of every dense A_h (d, d), rank // H components each, singular values folded into
    U: the reference for ``head_svd``."""
    d_out, _ = wq.shape
    wq, wk = _check(wq, wk, num_heads, rank, d_out)
    assert rank % num_heads == 0, f"svd rank {rank} must be a multiple of {num_heads} heads"
    T, r = score_tensor(wq, wk, num_heads), rank // num_heads  # (H, d, d)
    with _tensorly_torch() as tl:
        parts = [tl.svd_interface(A, n_eigenvecs=r, method="truncated_svd") for A in T]  # (d, r), (r,), (r, d)
    U = torch.stack([u * s for u, s, _ in parts])  # (H, d, r)
    V = torch.stack([vt.T for _, _, vt in parts])  # (H, d, r)
    factors = Factors("svd", U, V, None, 0.0)
    factors.relative_error = relative_error(wq, wk, num_heads, factors)
    return factors


# ---- one entry point, and many layers at once ---------------------------------------------------------------

def decompose(wq: Tensor, wk: Tensor, num_heads: int, rank: int, method: str = "cp", *,
              solver: str = "structured", **options) -> Factors:
    """The registered ``method``'s (reduction/methods: cp, tucker, svd) ``solver``: ``structured`` (cp_als,
    tucker2, head_svd: never builds T) or ``tensorly`` (cp_tensorly, tucker_tensorly, svd_tensorly: the dense
    reference). ``options`` are the solver's (tensorly's names; ``svd`` takes none)."""
    from .methods import get

    return get(method).solve(wq, wk, num_heads, rank, solver=solver, **options)


def decompose_layers(layers: Sequence[tuple[Tensor, Tensor]], num_heads: int, rank: int | Sequence[int],
                     method: str = "cp", *, workers: int | None = None,
                     on_layer: Callable[[int, Factors], None] | None = None, **options) -> list[Factors]:
    """``decompose`` for every (wq, wk) of ``layers``, in order, with ``rank`` one key dim or one per layer.

    On the CPU the layers are solved concurrently, ``workers`` at a time (default: one per usable core, at most
    torch's thread count), each single-threaded: the same factors as one ``decompose`` call per layer, faster, and
    a busy neighbour process costs its fair share of the cores instead of stalling every call. On a GPU the
    layers run one after another. The weights are read, never copied as a whole model. ``on_layer(index,
    factors)`` is called in the calling thread as each layer finishes (progress bars)."""
    ranks = [rank] * len(layers) if isinstance(rank, int) else list(rank)
    if len(ranks) != len(layers):
        raise ValueError(f"{len(ranks)} ranks given for {len(layers)} layers")
    device = layers[0][0].device if layers else None
    return parallel_map(lambda job: decompose(*job[0], num_heads, job[1], method, **options), zip(layers, ranks),
                        workers=workers, device=device, on_done=on_layer)


def cp_als_batched(layers: Sequence[tuple[Tensor, Tensor]], num_heads: int, rank: int | Sequence[int], *,
                   workers: int | None = None, on_layer: Callable[[int, Factors], None] | None = None,
                   **options) -> list[Factors]:
    """``cp_als`` for many layers at once (``decompose_layers`` with ``method="cp"``): what a weights-only
    reduction calls with all layers of a model."""
    return decompose_layers(layers, num_heads, rank, "cp", workers=workers, on_layer=on_layer, **options)
