"""Yu et al. (BMC Bioinformatics 22:314, 2021): the 3D Res U-Net that segments nodules and
the 3D ResNet50 that classifies them benign / malignant, with the plain networks the
paper compares against (the same classes with the paper's changes switched off).

All tensors are channels-last: volumes ``(B, D, H, W, C)`` = (batch, z, y, x, channels).

``res_unet3d`` (:class:`ResUNet3D`), a sub-case ``(B, 48, 192, 192, 1)`` in, foreground
logits ``(B, 48, 192, 192, 1)`` out::

    down i = 0..3:  ResidualUnit(w_i) -> max-pool 2x2x2           w_i = base * 2^i
    bottom:         ResidualUnit(base * 16)
    up i = 3..0:    ConvTranspose 2x2x2 stride 2 (-> w_i), concat skip i (-> 2 w_i),
                    ResidualUnit(w_i)                              (channels halve)
    out:            1x1x1 conv -> 1 logit

    ResidualUnit(c): conv3-IN-act, conv3-IN, + (identity, or 1x1x1 conv when the input
    has another channel count), act

With ``residual=False`` the unit is the plain U-Net's conv3-IN-act, conv3-IN-act (the
baseline). Every convolution has a bias and Xavier (Glorot uniform) weights; instance
norms have a scale and a bias. Parameters of a unit ``cin -> c`` (k = 27 taps)::

    residual: k cin c + c + 2c  +  k c c + c + 2c  +  [cin c + c if cin != c]
    plain:    k cin c + c + 2c  +  k c c + c + 2c

Every spatial size must divide by 16 (four pools).

``resnet50_3d`` (:class:`ResNet3D`): bottleneck ResNet (stages of 3, 4, 6, 3 blocks,
widths 64-128-256-512, expansion 4) on a ``(B, 16, 48, 48, 1)`` ROI -> ``(B, 2)`` logits.
The paper's 3D version (defaults) has a 3x3x3 stem with stride 1 and no max-pool, stage
strides 1, 2, 2, 2 (16x48x48 -> 2x6x6), and (1, 3, 3) middle kernels in the last two
stages (their depth is 4 and 2 slices, where a 3-deep kernel mostly sees padding). The
plain 3D ResNet50 (``stem_kernel=(7, 7, 7), stem_stride=2, stem_pool=True,
stage_kernels=((3, 3, 3),) * 4``) is the 2D network with every kernel made cubic.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lungjax.models.layers import BatchNorm, Conv, ConvTranspose, max_pool
from lungjax.registry import MODELS

_xavier = nn.initializers.xavier_uniform()
_he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualUnit(nn.Module):
    """conv3-IN-act, conv3-IN, + shortcut, act; ``(B, D, H, W, C_in) -> (B, D, H, W, C)``.

    Attributes:
      features: C.
      residual: False = the plain unit (conv3-IN-act twice, no shortcut).
      dtype: computation dtype (parameters stay float32).
      conv_impl: ``lungjax.models.layers.Conv`` implementation.
    """

    features: int
    residual: bool = True
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        def conv(h, k, name):
            return Conv(self.features, (k, k, k), kernel_init=_xavier, dtype=self.dtype,
                        impl=self.conv_impl, name=name)(h)

        def norm(h, name):
            # Instance norm: statistics per sample and channel over (D, H, W).
            return nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name=name)(h)

        h = nn.relu(norm(conv(x, 3, "conv1"), "norm1"))
        h = norm(conv(h, 3, "conv2"), "norm2")
        if not self.residual:
            return nn.relu(h)
        shortcut = x if x.shape[-1] == self.features else conv(x, 1, "proj")
        return nn.relu(h + shortcut)


@MODELS.register("res_unet3d")
class ResUNet3D(nn.Module):
    """The 3D Res U-Net (module docstring); ``(B, D, H, W, 1)`` float32 in [0, 1] ->
    ``(B, D, H, W, num_classes)`` float32 logits, D, H, W divisible by 16.

    Attributes:
      base_features: channels of the first down module (doubling to 16 x at the bottom).
      num_classes: output channels (1 = one sigmoid foreground logit).
      residual: False = the plain 3D U-Net.
      dtype: computation dtype; conv_impl: see ``layers.Conv``.
    """

    base_features: int = 32
    num_classes: int = 1
    residual: bool = True
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # instance norm behaves the same in training and evaluation
        if any(s % 16 for s in x.shape[1:4]):
            raise ValueError(f"ResUNet3D needs D, H, W divisible by 16, got {x.shape[1:4]}")
        unit = dict(residual=self.residual, dtype=self.dtype, conv_impl=self.conv_impl)
        widths = [self.base_features * 2 ** i for i in range(4)]
        skips = []
        for i, w in enumerate(widths):
            x = ResidualUnit(w, name=f"down{i}", **unit)(x)
            skips.append(x)
            x = max_pool(x, (2, 2, 2))
        x = ResidualUnit(self.base_features * 16, name="bottom", **unit)(x)
        for i in reversed(range(4)):
            x = ConvTranspose(widths[i], (2, 2, 2), strides=(2, 2, 2), kernel_init=_xavier,
                              dtype=self.dtype, impl=self.conv_impl, name=f"upconv{i}")(x)
            x = jnp.concatenate([x, skips[i]], axis=-1)
            x = ResidualUnit(widths[i], name=f"up{i}", **unit)(x)
        return Conv(self.num_classes, (1, 1, 1), kernel_init=_xavier, dtype=self.dtype,
                    impl=self.conv_impl, name="out")(x)


def res_unet3d_param_count(base: int, in_channels: int = 1, num_classes: int = 1,
                           residual: bool = True) -> int:
    """Parameters of :class:`ResUNet3D` from its widths (the module docstring's sums)."""

    def unit(cin, c):
        n = 27 * cin * c + c + 2 * c + 27 * c * c + c + 2 * c
        return n + (cin * c + c if residual and cin != c else 0)

    widths = [base * 2 ** i for i in range(4)]
    n, cin = 0, in_channels
    for w in widths:
        n += unit(cin, w)
        cin = w
    n += unit(cin, base * 16)
    cin = base * 16
    for w in reversed(widths):
        n += 8 * cin * w + w  # 2x2x2 transposed conv
        n += unit(2 * w, w)
        cin = w
    return n + cin * num_classes + num_classes


class Bottleneck3D(nn.Module):
    """1x1x1 -> k -> 1x1x1 bottleneck with BN-ReLU, projection shortcut on a change of
    stride or width; ``(B, D, H, W, C) -> (B, D', H', W', 4 width)``."""

    width: int
    strides: Sequence[int] = (1, 1, 1)
    kernel: Sequence[int] = (3, 3, 3)
    bn_momentum: float = 0.9
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(h, name):
            return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                             dtype=self.dtype, name=name)(h)

        def conv(h, f, k, s, name):
            return Conv(f, tuple(k), strides=tuple(s), use_bias=False, kernel_init=_he_normal,
                        dtype=self.dtype, impl=self.conv_impl, name=name)(h)

        out = 4 * self.width
        h = nn.relu(bn(conv(x, self.width, (1, 1, 1), (1, 1, 1), "conv1"), "bn1"))
        h = nn.relu(bn(conv(h, self.width, self.kernel, self.strides, "conv2"), "bn2"))
        h = bn(conv(h, out, (1, 1, 1), (1, 1, 1), "conv3"), "bn3")
        if x.shape[-1] != out or any(s != 1 for s in self.strides):
            x = bn(conv(x, out, (1, 1, 1), self.strides, "proj"), "proj_bn")
        return nn.relu(h + x)


@MODELS.register("resnet50_3d")
class ResNet3D(nn.Module):
    """A 3D bottleneck ResNet (module docstring): ``(B, D, H, W, 1)`` float32 ROI ->
    ``(B, num_classes)`` float32 logits (global average pool, then a dense layer).

    Attributes:
      blocks: bottleneck blocks per stage (ResNet50: 3, 4, 6, 3).
      widths: bottleneck width per stage (outputs 4 x).
      stem_features, stem_kernel, stem_stride: the first convolution.
      stem_pool: a 3x3x3 stride-2 max-pool after the stem (2D ResNet's; ``max_pool``
        here is the non-overlapping 2x2x2 one, which the plain baseline uses).
      stage_strides: stride of each stage's first block (per axis, the same on all).
      stage_kernels: middle kernel of the blocks of each stage.
      num_classes: 2 = benign / malignant.
    """

    blocks: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_features: int = 64
    stem_kernel: Sequence[int] = (3, 3, 3)
    stem_stride: int = 1
    stem_pool: bool = False
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stage_kernels: Sequence[Sequence[int]] = ((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3))
    num_classes: int = 2
    bn_momentum: float = 0.9
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not len(self.blocks) == len(self.widths) == len(self.stage_strides) == \
                len(self.stage_kernels):
            raise ValueError("ResNet3D: blocks, widths, stage_strides and stage_kernels need "
                             "one entry per stage")
        x = Conv(self.stem_features, tuple(self.stem_kernel), strides=self.stem_stride,
                 use_bias=False, kernel_init=_he_normal, dtype=self.dtype, impl=self.conv_impl,
                 name="stem")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                              dtype=self.dtype, name="stem_bn")(x))
        if self.stem_pool:
            x = max_pool(x, (2, 2, 2))
        for s, (n, w, st, k) in enumerate(zip(self.blocks, self.widths, self.stage_strides,
                                               self.stage_kernels)):
            for b in range(n):
                stride = (st,) * 3 if b == 0 else (1, 1, 1)
                x = Bottleneck3D(w, stride, tuple(k), self.bn_momentum, self.dtype,
                                 self.conv_impl, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
        return nn.Dense(self.num_classes, name="head")(x)


def resnet3d_param_count(blocks, widths, stem_features, stem_kernel, stage_strides,
                         stage_kernels, in_channels: int = 1, num_classes: int = 2) -> int:
    """Trainable parameters of :class:`ResNet3D` (batch-norm scale and bias counted, its
    running statistics not)."""
    n = in_channels * stem_features * int(np.prod(stem_kernel)) + 2 * stem_features
    cin = stem_features
    for nb, w, st, k in zip(blocks, widths, stage_strides, stage_kernels):
        taps = int(np.prod(k))
        for b in range(nb):
            out = 4 * w
            n += cin * w + 2 * w + taps * w * w + 2 * w + w * out + 2 * out
            if cin != out or (b == 0 and st != 1):  # projection shortcut
                n += cin * out + 2 * out
            cin = out
    return n + cin * num_classes + num_classes
