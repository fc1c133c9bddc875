"""The output objective of the sequential reduction, as tensor math (no modules): fit the query/key factors of a
layer to what its attention OUTPUT does with the scores, on the inputs the reduced layers below actually produce.

Notation for one layer (d hidden, H heads of dh): x the original model's input tokens, x~ the reduced model's (the
"reduced stream"), p_ij^h the ORIGINAL attention probabilities, v_j^h the values, u_j^h = W_O^h v_j^h a value in
output space, ubar_i^h = sum_j p_ij^h u_j^h.

* Output metric (key side). A score error ds_ij moves query i's output by sum_j p_ij (u_j - ubar_i) ds_ij (first
  order; the softmax is shift invariant, so a per-query constant costs nothing). With ds_ij = x_i^T D y_j and query i
  weighted by w_i, the squared output error summed over queries is, in the Kronecker approximation,
  tr(D^T (sum_i w_i x_i x_i^T) D (Y^T S Y)), with the (T, T) key metric
      S[j, j'] = sum_h sum_i w_i p_ij p_ij' (u_j - ubar_i) . (u_j' - ubar_i).
  ``output_metric`` builds S per sequence; the key side is whitened by Ck = Y~^T S Y~ / n instead of the plain second
  moment, so that the decomposition spends its rank where the output is sensitive.
* Query side: the token-weighted second moment of x~, centred; the query mean is absorbed exactly into the content
  bias (``centred_content_bias``).
* Input maps: x ~ Pq x~ (query side, centred least squares) and y ~ Pk y~ (key side, in the S metric) carry the
  original scores over to the reduced stream: the target for head h is Pq^T A_h Pk.
* Head weights: head h's share of the output metric, alpha_h = (share_h / mean share)^1/2, scales head h's rows of
  the whitened query weights, so the shared factors favour the heads whose scores move the output.
* Token weights (``rollout``): how much each token of each layer reaches what the model is read at (the first token
  of the last layer for a classifier, the mean of the last layer's tokens for an encoder), by attention rollout on the
  original model (Abnar & Zuidema 2020) with half of each step on the residual path; times the gain of the LayerNorm
  that reads the layer's output at that token (``norm_gain``): what the next layer sees is the normalised residual
  sum, so an error counts in units of its token's spread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .calibrate import check_finite_statistics, whitening
from .decompose import Factors

f64 = torch.float64
SHRINKAGE = 0.3  # the query and key metrics are shrunk to C + 0.3 x their mean eigenvalue x I before whitening
QUERY_MAP_RIDGE = 0.1  # a query input map fitted on few rows: ridge 0.1 x d / rows (query_map)
QUERY_MAP_FEW_ROWS = 10  # ... fewer than this many rows a dimension (a classifier's last layer, one query a sequence)


def head_gram(wo: Tensor, heads: int) -> Tensor:
    """G_h = W_O^h^T W_O^h (H, dh, dh) of an output projection wo (d_out, H*dh)."""
    w = wo.reshape(wo.shape[0], heads, -1)  # (d_out, H, dh)
    return torch.einsum("ohi,ohj->hij", w, w)


def mean_pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean over real tokens (B, d) of hidden states (B, T, d) under an attention mask (B, T): how a sentence
    encoder is read, both when it is scored and when its sensitivity is measured."""
    m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


POOLING = ("mean", "cls", "max")  # sentence-transformers' Pooling modes mhacompress reads (mean_sqrt_len: as mean)


def pooled(hidden: Tensor, mask: Tensor, mode: str = "mean") -> Tensor:
    """A sentence embedding (B, d) from hidden states (B, T, d) under an attention mask (B, T), as a
    sentence-transformers Pooling module of ``mode`` gives it: the mean over real tokens, the first token's state,
    or the maximum over real tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
    return mean_pooled(hidden, mask)


def pooling_of(model) -> str:
    """How ``model``'s sentence embedding is pooled: what ``hub`` read from its sentence-transformers folder
    (``model.sentence_head``), else the mean (mhacompress's convention for a bare encoder)."""
    return getattr(getattr(model, "sentence_head", None), "pooling", "mean")


def output_metric(x: Tensor, p: Tensor, v: Tensor, gram: Tensor, tokens: Tensor, weights: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """The key metric S (B, T, T), summed over heads, and each head's share (H,) of the output error,
    tr(Y^T S_h Y), for one batch.

    x (B, T, d) the original inputs; p (B, H, T, T) original attention probabilities; v (B, H, T, dh) values;
    gram (H, dh, dh) = W_O^h^T W_O^h; tokens (B, T) real-token mask; weights (B, T) query weights (0 at padding)."""
    P = p * tokens.to(p.dtype)[:, None, :, None]  # real queries only (B, H, T, T)
    Pw = P * weights.to(p.dtype)[:, None, :, None]  # weighted queries
    vG = v @ gram[None]  # (B, H, T, dh)
    K = vG @ v.transpose(-1, -2)  # u_j . u_j'   (B, H, T, T)
    vbar = P @ v  # (B, H, T, dh)
    A = vbar @ vG.transpose(-1, -2)  # A[i, j] = ubar_i . u_j
    c = (vbar @ gram[None] * vbar).sum(-1)  # ubar_i . ubar_i   (B, H, T)
    PwT = Pw.transpose(-1, -2)
    # sum_i w_i p_ij p_ij' (u_j.u_j' - ubar_i.u_j - ubar_i.u_j' + ubar_i.ubar_i)
    S = K * (PwT @ P) - (Pw * A).transpose(-1, -2) @ P - PwT @ (P * A) + PwT @ (c[..., None] * P)
    share = (S * (x @ x.transpose(-1, -2))[:, None]).sum((0, 2, 3))  # (H,) tr(Y^T S_h Y)
    return S.sum(1), share.to(f64)


def rollout(maps: list[Tensor], readout: Tensor, tokens: Tensor, residual: float = 0.5) -> list[Tensor]:
    """Token weights (B, T) for every layer's queries: layer l's weight is how much each of its output tokens reaches
    ``readout`` (B, T) at the last layer, through w_{l-1} = w_l (residual I + (1 - residual) M_l), M_l the head-mean
    attention probabilities (B, T, T) of layer l. Zero at padding."""
    mask = tokens.to(readout.dtype)
    weights, w = [None] * len(maps), readout * mask
    for index in range(len(maps) - 1, -1, -1):
        weights[index] = w
        w = (residual * w + (1 - residual) * (w[:, None, :] @ maps[index].to(w.dtype))[:, 0]) * mask
    return weights


def norm_gain(s: Tensor, tokens: Tensor, eps: float) -> Tensor:
    """(B, T) the squared gain 1 / (var(s_t) + eps) of a LayerNorm at each token of its input s (B, T, d): to first
    order it scales an error in s_t by gamma / std(s_t) (after removing the error's mean over the features and its
    part along s_t - mean), so the next layer, which reads LayerNorm(x + W_O ctx + b), feels an output error more at a
    token of small spread. Floored at 1% of the real tokens' mean variance: no near-constant token (or padding) takes
    all the weight."""
    var = s.float().var(-1, unbiased=False)  # (B, T)
    floor = 1e-2 * var[tokens.bool()].mean()
    return 1.0 / (torch.maximum(var, floor) + eps)


def readout_weights(tokens: Tensor, first_token: bool) -> Tensor:
    """What the model is read at (B, T): the first token (a classifier's head), or the mean of the real tokens."""
    mask = tokens.to(torch.float32)
    if first_token:
        w = torch.zeros_like(mask)
        w[:, 0] = 1.0
        return w
    return mask / mask.sum(1, keepdim=True)


@dataclass
class OutputMoments:
    """Weighted sums over real tokens for one layer, float64. Query side: n, sums and (cross) second moments of x~
    (and x); key side: Y~^T S Y~ and Y^T S Y~; each head's share of the output metric."""

    d: int
    heads: int
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        def z(*shape):
            return torch.zeros(*shape, dtype=f64, device=self.device)

        self.n, self.n_key, self.rows = 0.0, 0, 0  # rows: query positions of non-zero weight
        self.sum_r, self.sum_o, self.rr, self.cross = z(self.d), z(self.d), z(self.d, self.d), z(self.d, self.d)
        self.krr, self.kor, self.share = z(self.d, self.d), z(self.d, self.d), z(self.heads)

    def add(self, x: Tensor, xr: Tensor, tokens: Tensor, weights: Tensor, S: Tensor, share: Tensor) -> None:
        """x, xr (B, T, d) original / reduced inputs; tokens (B, T) bool; weights (B, T) query weights; S (B, T, T)
        the batch's key metric and share (H,) its heads' shares (``output_metric``)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, xr, S = (t.to(self.device, dtype) for t in (x, xr, S))
        w = weights.to(self.device, dtype)[tokens][:, None]  # (N, 1)
        xo, xq = x[tokens], xr[tokens]  # (N, d)
        self.n += float(w.sum())
        self.rows += int((w > 0).sum())
        self.sum_r += (w * xq).sum(0).double()
        self.sum_o += (w * xo).sum(0).double()
        self.rr += ((w * xq).T @ xq).double()
        self.cross += ((w * xo).T @ xq).double()
        Sxr = S @ xr  # (B, T, d); S is zero at padding rows and columns
        self.krr += torch.einsum("btd,bte->de", xr, Sxr).double()
        self.kor += torch.einsum("btd,bte->de", x, Sxr).double()
        self.n_key += int(tokens.sum())
        self.share += share.to(self.device, f64)

    def means(self) -> tuple[Tensor, Tensor]:
        """Weighted means of the original and the reduced query inputs (d,)."""
        return self.sum_o / self.n, self.sum_r / self.n

    def query_metric(self) -> Tensor:
        """Centred, weighted second moment of the reduced stream's queries (d, d)."""
        mu_r = self.sum_r / self.n
        return self.rr / self.n - torch.outer(mu_r, mu_r)

    def key_metric(self) -> Tensor:
        """Y~^T S Y~ per token (d, d)."""
        return self.krr / self.n_key

    def query_map(self) -> Tensor:
        """Pq (d, d) with x - mu ~ Pq (x~ - mu~) in weighted least squares, pulled towards the identity by a ridge of
        QUERY_MAP_RIDGE x d / rows where it has fewer than QUERY_MAP_FEW_ROWS (10) rows a dimension (ridge_map's 1e-3
        otherwise): a d x d map fitted on few rows fits their noise. A classifier's last layer is queried at one token a
        sequence, 512 rows for MiniLM's 384 x 384 map. On the RTE model at key dim 96, a small change below it (a
        refinement step of 1e-2 instead of 3e-3) made that map put the last layer's query/key product 18.8x the
        original's norm away in the weights, and the dev KL to the original rose from 7.5 to 110 (x 1e-3); with this
        ridge it was 7.7 (docs/method.md). A layer queried at every token has tens of thousands of rows, and keeps
        1e-3."""
        mu_o, mu_r = self.means()
        ridge = QUERY_MAP_RIDGE * self.d / max(self.rows, 1) if self.rows < QUERY_MAP_FEW_ROWS * self.d else 1e-3
        return ridge_map(self.query_metric(), self.cross / self.n - torch.outer(mu_o, mu_r), ridge)

    def key_map(self) -> Tensor:
        """Pk (d, d) with y ~ Pk y~ in the output metric."""
        return ridge_map(self.key_metric(), self.kor / self.n_key)

    def head_weights(self, power: float = 0.5, floor: float = 1e-3) -> Tensor:
        """alpha (H,): each head's share of the output metric relative to the mean, to the power ``power``."""
        share = self.share / self.share.mean().clamp_min(1e-300)
        return share.clamp_min(floor).pow(power)


def ridge_map(metric: Tensor, cross: Tensor, ridge: float = 1e-3) -> Tensor:
    """P = (cross + r I)(metric + r I)^-1 (d, d), r = ridge * mean eigenvalue of ``metric``: the least-squares map
    from reduced to original inputs (x ~ P x~), given the reduced inputs' metric and the original-reduced cross
    moment, pulled towards the identity (the two streams start equal). Where the calibration tokens span every
    direction this is the plain least-squares map; in directions they never reach (fewer tokens than the width,
    as at a classifier's last layer, read at its first token only) it is the identity, not whatever the rounding
    noise of a near-singular metric makes of it. Statistics that are not finite are a NonFiniteProblem."""
    check_finite_statistics(metric, cross)
    d = metric.shape[0]
    r = ridge * metric.trace() / d * torch.eye(d, dtype=metric.dtype, device=metric.device)
    return torch.linalg.solve(metric + r, (cross + r).T).T  # metric symmetric


def scale_heads(w: Tensor, alpha: Tensor) -> Tensor:
    """Head h's rows of w (H*dh, d) times alpha_h."""
    heads = alpha.shape[0]
    return (w.reshape(heads, -1, w.shape[1]) * alpha[:, None, None].to(w.dtype)).reshape(w.shape)


def unscale_heads(factors: Factors, alpha: Tensor) -> Factors:
    """Factors of the head-weighted problem mapped back: each head's mixing (or svd query factor) over alpha_h."""
    alpha = alpha.to(factors.U.dtype)
    if factors.method == "svd":
        return replace(factors, U=factors.U / alpha[:, None, None])
    shape = (-1,) + (1,) * (factors.mixing.ndim - 1)
    return replace(factors, mixing=factors.mixing / alpha.view(shape))


def key_side(factors: Factors, mu: Tensor) -> Tensor:
    """Rows h: A_hat_h^T mu (H, d), the key-dependent score term of a fixed query input mu."""
    U, V, M = factors.U, factors.V, factors.mixing
    if factors.method == "cp":  # A_h = U diag(m_h) V^T
        return (M * (U.T @ mu)[None]) @ V.T
    if factors.method == "tucker":  # A_h = U G_h V^T
        return torch.einsum("hrs,r,ds->hd", M, U.T @ mu, V)
    return torch.einsum("hdr,hr->hd", V, torch.einsum("hdr,d->hr", U, mu))  # A_h = U_h V_h^T


def centred_content_bias(wq: Tensor, bq: Tensor | None, wk: Tensor, heads: int, mu: Tensor, factors: Factors,
                 mu_r: Tensor, key_map: Tensor | None) -> Tensor:
    """The content bias (H, d) that keeps the mean query's scores exact: row h is W_k^h^T (W_q^h mu + b_q^h),
    carried to reduced keys by the key map, minus what the factors already give the reduced mean query mu_r."""
    q = wq @ mu + (0 if bq is None else bq)  # the mean original query (H*dh,)
    c = torch.einsum("hid,hi->hd", wk.reshape(heads, -1, wk.shape[1]), q.reshape(heads, -1))  # (H, d)
    if key_map is not None:
        c = c @ key_map
    return c - key_side(factors, mu_r)


def whitened_problem(wq: Tensor, wk: Tensor, moments: OutputMoments, identity: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The layer's problem in the output metric: head-weighted, whitened target weights (H*dh, d) x 2, the maps
    back (Cq^-1/2, Ck^-1/2), the head weights alpha and the key map (None when the streams are still equal)."""
    wq, wk = wq.to(moments.device, f64), wk.to(moments.device, f64)
    key_map = None
    if not identity:
        wq, key_map = wq @ moments.query_map(), moments.key_map()
        wk = wk @ key_map
    sqrt_q, inv_q = whitening(moments.query_metric(), shrink=SHRINKAGE)
    sqrt_k, inv_k = whitening(moments.key_metric(), shrink=SHRINKAGE)
    alpha = moments.head_weights()
    return scale_heads(wq @ sqrt_q, alpha), wk @ sqrt_k, inv_q, inv_k, alpha, key_map
