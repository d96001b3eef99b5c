"""Randomised leaky ReLU (RReLU; Xu et al., "Empirical Evaluation of Rectified Activations
in Convolutional Network", 2015), the activation of xie2018's detector.

    y = x                 for x >= 0
    y = a * x             for x < 0

In training ``a`` is drawn independently for every element from U(lower, upper) (a fresh
draw per call, from the rng stream ``"rrelu"``); at inference ``a`` is the fixed mean
slope (lower + upper) / 2. Defaults lower = 1/8, upper = 1/3 are the values of Xu et al.
(and of PyTorch's ``nn.RReLU``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

RNG_STREAM = "rrelu"


def rrelu(x: jax.Array, slope: jax.Array | float) -> jax.Array:
    """Leaky ReLU with a given negative slope (scalar or broadcastable to ``x``)."""
    return jnp.where(x >= 0, x, x * jnp.asarray(slope, x.dtype))


class RReLU(nn.Module):
    """Randomised leaky ReLU.

    Attributes:
      lower: lower bound of the training slope distribution, 0 <= lower <= upper.
      upper: upper bound.
      rng_stream: name of the rng stream the training slopes come from. The engine must
        pass it, e.g. ``model.apply(v, x, train=True, rngs={"rrelu": key, ...})``.

    Call args:
      x: any shape, float.
      deterministic: True (inference) uses the mean slope; False draws one slope per
        element of ``x`` (same shape as ``x``).
    """

    lower: float = 1.0 / 8.0
    upper: float = 1.0 / 3.0
    rng_stream: str = RNG_STREAM

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if not 0.0 <= self.lower <= self.upper:
            raise ValueError(f"RReLU needs 0 <= lower <= upper, got lower={self.lower}, "
                             f"upper={self.upper}")
        if deterministic or self.lower == self.upper:
            return rrelu(x, 0.5 * (self.lower + self.upper))
        if not self.has_rng(self.rng_stream):
            raise ValueError(
                f"RReLU in training mode needs the rng stream {self.rng_stream!r}: call "
                f"apply(..., rngs={{{self.rng_stream!r}: key}}) or run with train=False")
        key = self.make_rng(self.rng_stream)
        # Draw in float32 whatever the compute dtype: bfloat16 uniforms are coarse.
        slope = jax.random.uniform(key, x.shape, jnp.float32, self.lower, self.upper)
        return rrelu(x, slope.astype(x.dtype))
