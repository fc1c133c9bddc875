"""What a reduction method is: its solvers, the layout of its factors in the collaborative module, and its cost.

Per layer, hidden size d, H heads, key dim R. A method turns the layer's W_q, W_k (H*dh, d) into ``Factors`` and
says how the module holds them (``layout``: diagonal / core / per-head mixing, see modeling/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import given
from ..decompose import Factors


@dataclass(frozen=True)
class Method:
    name: str
    layout: str  # how CollaborativeSelfAttention combines the shared query and key
    solvers: dict[str, Callable[..., Factors]]  # "structured" (default), "tensorly": (wq, wk, H, R, **options)
    iterative: bool = True  # takes n_iter_max, tol, init, random_state
    key_dim_multiple_of_heads: bool = False

    def solve(self, wq: torch.Tensor, wk: torch.Tensor, heads: int, rank: int, *, solver: str = "structured",
              **options) -> Factors:
        """The layer's factors: T[h] = W_q^h^T W_k^h ~ [[factors]] at key dim ``rank``. ``options``: the solver's
        (tensorly's names: n_iter_max, tol, init, random_state), ignored by a closed-form method."""
        if solver not in self.solvers:
            raise ValueError(f"solver must be one of {', '.join(self.solvers)}; got {solver!r}")
        return self.solvers[solver](wq, wk, heads, rank, **(options if self.iterative else {}))

    def check_key_dim(self, key_dim: int, heads: int, head_dim: int) -> str | None:
        """Why ``key_dim`` does not fit a layer of ``heads`` x ``head_dim`` (None when it does)."""
        top = heads * head_dim
        if not 1 <= key_dim <= top:
            return f"key dim {key_dim} is out of range: this model takes 1..{top} ({heads} heads x {head_dim})"
        if self.key_dim_multiple_of_heads and key_dim % heads:
            lower, upper = key_dim // heads * heads, -(-key_dim // heads) * heads
            near = " or ".join(str(k) for k in (lower, upper) if 1 <= k <= top)
            return (f"{given('--method', self.name)} splits the key dim over {heads} heads: {key_dim} is not a "
                    f"multiple of {heads}; pass {near}, or {given('--method', 'cp')} (any key dim)")
        return None

    def module_weights(self, factors: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(query_proj (R, d), key_proj (R, d), mixing or None) of the collaborative module."""
        return factors.U.T, factors.V.T, factors.mixing

    # ---- cost (multiply-adds, biases not counted as MACs; see compress/cost.py) -----------------------------

    def mixing_params(self, d: int, heads: int, key_dim: int) -> int:
        return 0

    def qk_params(self, d: int, heads: int, key_dim: int) -> int:
        """Parameters that score tokens: the two projections, the mixing and the content bias (H x d)."""
        return 2 * d * key_dim + self.mixing_params(d, heads, key_dim) + heads * d

    def projection_macs(self, d: int, heads: int, key_dim: int) -> int:
        """Per token: the projections, the mixing applied to every query, and the content bias."""
        return 2 * d * key_dim + self.mixing_params(d, heads, key_dim) + heads * d

    def score_macs(self, d: int, heads: int, key_dim: int) -> int:
        """Per (query, key) pair, all heads: every head scores in the full shared key dim."""
        return heads * key_dim
