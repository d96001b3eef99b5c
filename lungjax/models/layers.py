"""Shared layers. Every lungjax model builds its convolutions through ``Conv`` /
``ConvTranspose`` here, so the implementation (XLA native or a CPU-fast formulation)
is chosen in one place.

NOTE: provisional implementation that delegates to ``flax.linen``; the signature is
the contract other modules code against.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn


class Conv(nn.Module):
    """N-d convolution on channels-last inputs (2D: (B, H, W, C); 3D: (B, D, H, W, C)).

    Parameters are named and shaped exactly as ``flax.linen.Conv`` ("kernel":
    (*kernel_size, C_in, C_out), "bias": (C_out,)), whatever ``impl`` is.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        import jax.numpy as jnp

        return nn.Conv(
            self.features, tuple(self.kernel_size), strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype or jnp.float32, kernel_init=self.kernel_init,
            bias_init=self.bias_init, name="conv")(x)


class ConvTranspose(nn.Module):
    """N-d transposed convolution (decoder up-sampling), channels-last."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Any = "SAME"
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        import jax.numpy as jnp

        return nn.ConvTranspose(
            self.features, tuple(self.kernel_size), strides=self.strides, padding=self.padding,
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype or jnp.float32,
            kernel_init=self.kernel_init, bias_init=self.bias_init, name="conv")(x)
