"""Sathish et al. (EMBC 2020) networks: 2D lung segmenters, the Turing-test discriminator
and the modified LeNet patch classifier. All channels-last, all convolutions through
``lungjax.models.layers.Conv``.

==========================  ====================================  ===================
model (registry key)        input -> output                       trainable params
==========================  ====================================  ===================
``sathish2020_unet``        (B, H, W, 1) -> (B, H, W, 2) logits    34,525,954
``sathish2020_r2unet``      (B, H, W, 1) -> (B, H, W, 2) logits    39,091,330 (t = 2)
``sathish2020_sumnet``      (B, H, W, 1) -> (B, H, W, 2) logits    23,863,336
``sathish2020_turing``      (B, H, W, 2) -> (B, 2) logits          1,133,696 at 512x512
``sathish2020_lenet``       (B, 64, 64, 1) -> (B, 2) logits        50,162
==========================  ====================================  ===================

(counts at the default widths, ``features=64``; H and W of the segmenters must be
multiples of 16 (U-Net, R2U-Net) or 32 (SUMNet).)

The layouts are those of the authors' public PyTorch code, which is what the paper's
counts measure: U-Net and R2U-Net as in the widely used "Image_Segmentation" networks
(conv blocks Conv-BN-ReLU x 2; up-sampling = nearest x2 then Conv-BN-ReLU; R2U-Net's
recurrent block applies one Conv-BN-ReLU t + 1 times, ``x1 = f(x); x1 = f(x + x1)`` t
times); SUMNet = a 1x1 convolution to 3 channels (the ImageNet VGG takes RGB), the
VGG11-with-batch-norm encoder, and a decoder that unpools with the encoder's max-pool
indices, concatenates the encoder feature of that scale and applies plain (bias, no
batch norm) 3x3 convolutions. Batch norm is ``layers.BatchNorm`` with PyTorch's
running-average momentum 0.1 (``momentum=0.9`` here) and epsilon 1e-5.

Modules whose cost the paper's FLOP counter charges per element (LeakyReLU) are small
modules with ``FLOPS_PER_ELEMENT`` so that ``lungjax.models.flops`` sees them.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lungjax.models.layers import BatchNorm, Conv, max_pool
from lungjax.registry import MODELS

BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1: running = 0.9 * running + 0.1 * batch
BN_EPSILON = 1e-5


# ----------------------------------------------------------------------------------
# Max-pooling with indices and unpooling
# ----------------------------------------------------------------------------------


def _windows(x, window: Sequence[int]):
    """(B, H, W, C) -> (B, H/wh, W/ww, C, wh*ww): each window's values in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"max_pool_with_indices: spatial size {(h, w)} is not a multiple of "
                         f"the window {tuple(window)}")
    x = x.reshape(b, h // wh, wh, w // ww, ww, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // wh, w // ww, c, wh * ww)


def max_pool_with_indices(x, window: Sequence[int] = (2, 2)):
    """Max-pooling over non-overlapping windows that also returns where each maximum was.

    Args:
      x: (B, H, W, C); H and W multiples of the window.
      window: (wh, ww).

    Returns:
      ``(values, indices)``: (B, H/wh, W/ww, C) in x's dtype, and (B, H/wh, W/ww, C)
      int32 offsets of the maximum inside its window, row-major (``dy * ww + dx``), the
      first maximum on ties as PyTorch's ``MaxPool2d(return_indices=True)`` picks it (its
      flat index is ``(i * wh + dy) * W + (j * ww + dx)``). The gradient of ``values``
      goes to that element only.
    """
    win = _windows(x, tuple(int(v) for v in window))
    idx = jnp.argmax(jax.lax.stop_gradient(win), axis=-1).astype(jnp.int32)
    values = jnp.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
    return values, idx


def max_unpool(x, indices, window: Sequence[int] = (2, 2)):
    """Inverse of :func:`max_pool_with_indices`: each value goes back to the position its
    window's maximum came from, every other position is 0 (PyTorch's ``MaxUnpool2d``).

    Args:
      x: (B, h, w, C) values (a decoder feature of the pooled size).
      indices: (B, h, w, C) int32 window offsets from :func:`max_pool_with_indices`.
      window: (wh, ww).

    Returns:
      (B, h * wh, w * ww, C) in x's dtype.
    """
    wh, ww = (int(v) for v in window)
    b, h, w, c = x.shape
    if indices.shape != x.shape:
        raise ValueError(f"max_unpool: indices {indices.shape} do not match values {x.shape}")
    onehot = jax.nn.one_hot(indices, wh * ww, dtype=x.dtype)          # (B, h, w, C, wh*ww)
    y = (onehot * x[..., None]).reshape(b, h, w, c, wh, ww)
    return y.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * wh, w * ww, c)


def upsample_nearest(x, factor: int = 2):
    """(B, H, W, C) -> (B, H * f, W * f, C), each pixel repeated (``nn.Upsample``'s default)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class LeakyReLU(nn.Module):
    """``leaky_relu`` as a module, so that a FLOP counter charges it (one per element)."""

    negative_slope: float = 0.2
    FLOPS_PER_ELEMENT = 1

    @nn.compact
    def __call__(self, x):
        return nn.leaky_relu(x, self.negative_slope)


def _bn(train: bool, name: str | None = None):
    return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     name=name)


def _widths(features: int, multipliers: Sequence[int]) -> tuple[int, ...]:
    # The papers' widths are multiples of 64; ``features`` scales them all (CPU variants).
    return tuple(max(1, features * m // 64) for m in multipliers)


# ----------------------------------------------------------------------------------
# U-Net and R2U-Net
# ----------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """3x3 Conv (bias) -> BatchNorm -> ReLU, SAME padding: (B, H, W, C) -> (B, H, W, F)."""

    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.features, (3, 3), impl=self.conv_impl, name="conv")(x)
        return nn.relu(_bn(train, "bn")(x))


class UpConv(nn.Module):
    """Nearest x2 up-sampling then ConvBNReLU: (B, H, W, C) -> (B, 2H, 2W, F)."""

    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvBNReLU(self.features, self.conv_impl, name="up")(upsample_nearest(x), train)


class ConvBlock(nn.Module):
    """Two ConvBNReLU: (B, H, W, C) -> (B, H, W, F)."""

    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBNReLU(self.features, self.conv_impl, name="conv1")(x, train)
        return ConvBNReLU(self.features, self.conv_impl, name="conv2")(x, train)


class RecurrentBlock(nn.Module):
    """One ConvBNReLU f applied t + 1 times: ``x1 = f(x)``, then t times ``x1 = f(x + x1)``."""

    features: int
    t: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        f = ConvBNReLU(self.features, self.conv_impl, name="conv")
        x1 = f(x, train)
        for _ in range(self.t):
            x1 = f(x + x1, train)
        return x1


class RRCNNBlock(nn.Module):
    """Recurrent residual block: 1x1 Conv to F, two recurrent blocks, residual sum."""

    features: int
    t: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.features, (1, 1), impl=self.conv_impl, name="conv1x1")(x)
        x1 = RecurrentBlock(self.features, self.t, self.conv_impl, name="rec1")(x, train)
        x1 = RecurrentBlock(self.features, self.t, self.conv_impl, name="rec2")(x1, train)
        return x + x1


class _UNetFamily(nn.Module):
    """Four 2x max-pools between five blocks, four up-convolutions with skip
    concatenation (skip first), a 1x1 head. ``block`` builds one encoder/decoder block."""

    num_classes: int = 2
    features: int = 64
    conv_impl: str = "auto"

    def block(self, features: int, name: str):
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Input sides must be multiples of this (four 2x pools)."""
        return 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = _widths(self.features, (64, 128, 256, 512, 1024))
        skips = []
        for i, f in enumerate(w):
            if i:
                x = max_pool(x, (2, 2))
            x = self.block(f, f"enc{i + 1}")(x, train)
            skips.append(x)
        for i in range(len(w) - 1, 0, -1):
            x = UpConv(w[i - 1], self.conv_impl, name=f"up{i + 1}")(x, train)
            x = jnp.concatenate([skips[i - 1], x], axis=-1)
            x = self.block(w[i - 1], f"dec{i + 1}")(x, train)
        return Conv(self.num_classes, (1, 1), impl=self.conv_impl, name="head")(x)


@MODELS.register("sathish2020_unet")
class UNet(_UNetFamily):
    """U-Net: (B, H, W, 1) float32 -> (B, H, W, num_classes) logits; H, W multiples of 16."""

    def block(self, features, name):
        return ConvBlock(features, self.conv_impl, name=name)


@MODELS.register("sathish2020_r2unet")
class R2UNet(_UNetFamily):
    """R2U-Net (recurrent residual U-Net, t recurrences): (B, H, W, 1) float32 ->
    (B, H, W, num_classes) logits; H, W multiples of 16."""

    t: int = 2

    def block(self, features, name):
        return RRCNNBlock(features, self.t, self.conv_impl, name=name)


# ----------------------------------------------------------------------------------
# SUMNet
# ----------------------------------------------------------------------------------


class VGG11BNEncoder(nn.Module):
    """VGG11-with-batch-norm features: (B, H, W, 3) -> the five pre-pool features
    (B, H / 2^i, W / 2^i, C_i) for i = 0..4 (C = 64, 128, 256, 512, 512 at
    ``features=64``), the pooled bottom (B, H/32, W/32, 512) and the five max-pool
    indices (int32 window offsets, see :func:`max_pool_with_indices`)."""

    features: int = 64
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = _widths(self.features, (64, 128, 256, 256, 512, 512, 512, 512))
        # (conv name, width index, pool after it)
        plan = (("conv1", 0, True), ("conv2", 1, True), ("conv3a", 2, False),
                ("conv3b", 3, True), ("conv4a", 4, False), ("conv4b", 5, True),
                ("conv5a", 6, False), ("conv5b", 7, True))
        skips, indices = [], []
        for k, (name, i, pool) in enumerate(plan):
            x = Conv(w[i], (3, 3), impl=self.conv_impl, name=name)(x)
            x = nn.relu(_bn(train, f"bn{k + 1}")(x))
            if pool:
                skips.append(x)
                x, idx = max_pool_with_indices(x)
                indices.append(idx)
        return skips, x, indices


@MODELS.register("sathish2020_sumnet")
class SUMNet(nn.Module):
    """SUMNet: (B, H, W, 1) float32 -> (B, H, W, num_classes) logits; H, W multiples of 32.

    Encoder ``encoder`` (VGG11-BN after a 1x1 ReLU convolution to 3 channels); decoder:
    at each scale unpool with that scale's max-pool indices, concatenate the encoder's
    pre-pool feature (unpooled first), 3x3 Conv + ReLU (one or two per scale), and a 1x1
    head.
    """

    num_classes: int = 2
    features: int = 64
    conv_impl: str = "auto"

    def size_multiple(self) -> int:
        """Input sides must be multiples of this (five 2x pools)."""
        return 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Conv(3, (1, 1), impl=self.conv_impl, name="preconv")(x))
        skips, x, indices = VGG11BNEncoder(self.features, self.conv_impl, name="encoder")(
            x, train)
        w = _widths(self.features, (512, 512, 512, 256, 256, 128, 64, 32))
        # per scale (deepest first): the decoder convolutions' widths
        plan = ((("donv5b", w[0]), ("donv5a", w[1])), (("donv4b", w[2]), ("donv4a", w[3])),
                (("donv3b", w[4]), ("donv3a", w[5])), (("donv2", w[6]),), (("donv1", w[7]),))
        for level, convs in enumerate(plan):
            s = 4 - level
            x = jnp.concatenate([max_unpool(x, indices[s]), skips[s]], axis=-1)
            for name, f in convs:
                x = nn.relu(Conv(f, (3, 3), impl=self.conv_impl, name=name)(x))
        return Conv(self.num_classes, (1, 1), impl=self.conv_impl, name="output")(x)


# ----------------------------------------------------------------------------------
# Turing-test discriminator
# ----------------------------------------------------------------------------------


@MODELS.register("sathish2020_turing")
class TuringDiscriminator(nn.Module):
    """Which channel of a (ground truth, prediction) pair is the ground truth.

    (B, H, W, 2) float32 mask pair in [0, 1] -> (B, 2) logits (a sigmoid per channel:
    "channel k is the ground truth"). Bias-free unpadded 3x3 convolutions with LeakyReLU
    0.2: 2->F, pool; F->2F BN, pool; 2F->2F BN; 2F->4F BN, pool; 4F->4F BN, pool; then a
    ``final_kernel`` convolution to 2 channels and a LeakyReLU (F = ``features``).

    ``pools`` = (3, 3, 3, 2) and ``final_kernel`` = 7 at 512x512 (the paper) leave a 1x1
    output. Smaller slices (CPU variants) take smaller pools / kernel; any spatial
    output left is averaged, so the logits are (B, 2) whatever the input size.
    """

    features: int = 64
    pools: Sequence[int] = (3, 3, 3, 2)
    final_kernel: int = 7
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        f = self.features
        p1, p2, p3, p4 = (int(p) for p in self.pools)

        def conv(x, feats, name, k=3):
            return Conv(feats, (k, k), padding="VALID", use_bias=False, impl=self.conv_impl,
                        name=name)(x)

        def pool(x, p):
            return max_pool(x, (p, p)) if p > 1 else x

        x = pool(LeakyReLU(name="act1")(conv(x, f, "conv1")), p1)
        x = pool(LeakyReLU(name="act2")(_bn(train, "bn2")(conv(x, 2 * f, "conv2"))), p2)
        x = LeakyReLU(name="act3")(_bn(train, "bn3")(conv(x, 2 * f, "conv3")))
        x = pool(LeakyReLU(name="act4")(_bn(train, "bn4")(conv(x, 4 * f, "conv4"))), p3)
        x = pool(LeakyReLU(name="act5")(_bn(train, "bn5")(conv(x, 4 * f, "conv5"))), p4)
        if min(x.shape[1:3]) < self.final_kernel:
            raise ValueError(f"sathish2020_turing: input too small for pools {tuple(self.pools)}"
                             f" and final_kernel {self.final_kernel} (feature map "
                             f"{x.shape[1:3]} before the last convolution)")
        x = LeakyReLU(name="act6")(conv(x, 2, "conv6", self.final_kernel))
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------
# Modified LeNet
# ----------------------------------------------------------------------------------


@MODELS.register("sathish2020_lenet")
class LeNet(nn.Module):
    """The paper's modified LeNet: (B, 64, 64, 1) float32 -> (B, 2) logits.

    conv5x5 1->6, ReLU, pool 2; conv5x5 6->16, ReLU, pool 2; conv5x5 16->16 (the third
    kernel is 5), channel dropout, ReLU, pool 2 -> 4x4x16 = 256 features; FC 256->120,
    ReLU, dropout, 120->84, ReLU, dropout, 84->2. Dropout rate 0.5 (PyTorch's default)
    from the "dropout" stream.
    """

    num_classes: int = 2
    dropout_rate: float = 0.5
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = max_pool(nn.relu(Conv(6, (5, 5), padding="VALID", impl=self.conv_impl,
                                  name="conv1")(x)), (2, 2))
        x = max_pool(nn.relu(Conv(16, (5, 5), padding="VALID", impl=self.conv_impl,
                                  name="conv2")(x)), (2, 2))
        x = Conv(16, (5, 5), padding="VALID", impl=self.conv_impl, name="conv3")(x)
        # Dropout2d: whole channels dropped (the mask broadcast over H and W).
        x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = max_pool(nn.relu(x), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc3")(x)
