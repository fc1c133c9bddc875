"""tucker: T[h] ~ U G_h V^T with orthonormal U, V (d x R) and a full core per head G (H x R x R)."""

from .. import decompose
from .base import Method


class Tucker(Method):
    def mixing_params(self, d, heads, key_dim):
        return heads * key_dim * key_dim


METHOD = Tucker(name="tucker", layout="core",
                solvers={"structured": decompose.tucker2, "tensorly": decompose.tucker_tensorly})
