"""cp: collaborative heads. T[h] ~ U diag(m_h) V^T, one shared U, V (d x R) and a mixing M (H x R)."""

from .. import decompose
from .base import Method


class CP(Method):
    def mixing_params(self, d, heads, key_dim):
        return heads * key_dim


METHOD = CP(name="cp", layout="diagonal", solvers={"structured": decompose.cp_als, "tensorly": decompose.cp_tensorly})
