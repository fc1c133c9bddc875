"""svd: per-head truncated SVD, the baseline. Each head keeps rank R/H of its own A_h; nothing is shared."""

from .. import decompose
from .base import Method


class HeadSVD(Method):
    def module_weights(self, factors):
        """Per-head U, V (H, d, r) stacked head by head into (H*r, d) projections; no mixing."""
        u = factors.U.transpose(1, 2).reshape(-1, factors.U.shape[1])
        v = factors.V.transpose(1, 2).reshape(-1, factors.V.shape[1])
        return u, v, None

    def score_macs(self, d, heads, key_dim):
        return key_dim  # H heads x R/H


METHOD = HeadSVD(name="svd", layout="per-head",
                 solvers={"structured": decompose.head_svd, "tensorly": decompose.svd_tensorly},
                 iterative=False, key_dim_multiple_of_heads=True)
