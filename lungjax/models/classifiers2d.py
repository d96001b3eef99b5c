"""2D image classifiers trained from scratch: the baselines Shrey et al. 2020 compare
their benign / malignant classifier with (its Tables 1 and 2).

Every model maps a channels-last crop (B, H, W, C) float32 to (B, num_classes) logits
and takes ``train`` (dropout, batch-norm statistics). Widths are attributes so the CPU
schedules can shrink them; the defaults are the published networks' widths.

* ``FullyConnected2D`` ("fc_net_2d"): the flattened crop through ReLU dense layers.
* ``EncoderDecoderFC2D`` ("encoder_decoder_fc_2d"): a convolutional encoder (3x3 conv +
  2x2 max-pool per stage), a decoder of 2x2 up-convolutions back to the input size, and
  an FC head on the decoded map.
* ``ResNet50_2D`` ("resnet50_2d"): He et al. 2016, bottleneck blocks (3, 4, 6, 3),
  base width 64, 7x7/2 stem + 3x3/2 max-pool, global average pool.
* ``VGG16_2D`` ("vgg16_2d"): Simonyan & Zisserman 2015, 13 3x3 convolutions in five
  stages (64, 128, 256, 512, 512) with 2x2 max-pools, two FC layers with 50% dropout.
* ``DenseNet121_2D`` ("densenet121_2d"): Huang et al. 2017, dense blocks (6, 12, 24,
  16), growth 32, bottleneck 4 x growth, transitions halving channels and size.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lungjax.models.layers import BatchNorm, Conv, ConvTranspose, max_pool
from lungjax.registry import MODELS


def _avg_pool2(x):
    """2x2 average pool, stride 2, odd edges dropped: (B, H, W, C) -> (B, H//2, W//2, C)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h, :w]
    return x.reshape(x.shape[0], h // 2, 2, w // 2, 2, x.shape[-1]).mean(axis=(2, 4))


def _pool2(x):
    """2x2 max-pool that leaves a 1-pixel map alone (small crops in deep networks)."""
    return max_pool(x, (2, 2)) if min(x.shape[1:3]) >= 2 else x


@MODELS.register("fc_net_2d")
class FullyConnected2D(nn.Module):
    """(B, H, W, C) -> (B, num_classes): flatten, ReLU dense layers ``hidden``, dropout
    ``dropout`` before the output layer."""

    hidden: Sequence[int] = (512, 128)
    dropout: float = 0.5
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.hidden):
            x = nn.relu(nn.Dense(f, name=f"fc{i}")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="out")(x)


@MODELS.register("encoder_decoder_fc_2d")
class EncoderDecoderFC2D(nn.Module):
    """(B, H, W, C) -> (B, num_classes); H, W multiples of 2 ** len(features).

    Attributes:
      features: encoder stage widths (3x3 conv + ReLU, then 2x2 max-pool); the decoder
        mirrors them with 2x2 stride-2 up-convolutions.
      fc_features: the FC head's hidden width.
      dropout: before the output layer.
    """

    features: Sequence[int] = (32, 64)
    fc_features: int = 128
    dropout: float = 0.5
    num_classes: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, f in enumerate(self.features):
            x = nn.relu(Conv(f, (3, 3), impl=self.conv_impl, name=f"enc{i}")(x))
            x = max_pool(x, (2, 2))
        for i, f in reversed(list(enumerate(self.features))):
            x = nn.relu(ConvTranspose(f, (2, 2), strides=(2, 2), name=f"dec{i}")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.fc_features, name="fc")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="out")(x)


class _Bottleneck(nn.Module):
    features: int
    strides: int
    conv_impl: str

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        s = (self.strides, self.strides)
        y = nn.relu(bn("bn1")(Conv(self.features, (1, 1), use_bias=False,
                                   impl=self.conv_impl, name="conv1")(x)))
        y = nn.relu(bn("bn2")(Conv(self.features, (3, 3), strides=s, use_bias=False,
                                   impl=self.conv_impl, name="conv2")(y)))
        y = bn("bn3")(Conv(4 * self.features, (1, 1), use_bias=False, impl=self.conv_impl,
                           name="conv3")(y))
        if x.shape[-1] != y.shape[-1] or self.strides != 1:
            x = bn("proj_bn")(Conv(4 * self.features, (1, 1), strides=s, use_bias=False,
                                   impl=self.conv_impl, name="proj")(x))
        return nn.relu(x + y)


@MODELS.register("resnet50_2d")
class ResNet50_2D(nn.Module):
    """(B, H, W, C) -> (B, num_classes).

    Attributes:
      width: channels of the stem and the first stage's bottleneck (64 in ResNet50);
        stage s has width * 2 ** s, its output 4x that.
      blocks: bottleneck blocks per stage.
    """

    width: int = 64
    blocks: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.width, (7, 7), strides=(2, 2), use_bias=False, impl=self.conv_impl,
                 name="stem")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = _pool2(x)
        for s, n in enumerate(self.blocks):
            for b in range(n):
                x = _Bottleneck(self.width * 2 ** s, 2 if (b == 0 and s > 0) else 1,
                                self.conv_impl, name=f"stage{s}_block{b}")(x, train)
        return nn.Dense(self.num_classes, name="out")(jnp.mean(x, axis=(1, 2)))


@MODELS.register("vgg16_2d")
class VGG16_2D(nn.Module):
    """(B, H, W, C) -> (B, num_classes).

    Attributes:
      features: stage widths; each stage is ``convs`` 3x3 convolutions + ReLU and a
        2x2 max-pool.
      convs: convolutions per stage (2, 2, 3, 3, 3 in VGG16).
      fc_features: the two hidden FC layers' width (4096 in VGG16).
      dropout: after each hidden FC layer.
    """

    features: Sequence[int] = (64, 128, 256, 512, 512)
    convs: Sequence[int] = (2, 2, 3, 3, 3)
    fc_features: int = 4096
    dropout: float = 0.5
    num_classes: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for s, (f, n) in enumerate(zip(self.features, self.convs)):
            for i in range(n):
                x = nn.relu(Conv(f, (3, 3), impl=self.conv_impl, name=f"conv{s}_{i}")(x))
            x = _pool2(x)
        x = x.reshape(x.shape[0], -1)
        for i in range(2):
            x = nn.relu(nn.Dense(self.fc_features, name=f"fc{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="out")(x)


@MODELS.register("densenet121_2d")
class DenseNet121_2D(nn.Module):
    """(B, H, W, C) -> (B, num_classes).

    Attributes:
      growth: channels each dense layer adds (32 in DenseNet121); the stem has 2x that.
      blocks: dense layers per block.
      bottleneck: the 1x1 convolution's width as a multiple of ``growth``.
      compression: channel share kept by each transition.
    """

    growth: int = 32
    blocks: Sequence[int] = (6, 12, 24, 16)
    bottleneck: int = 4
    compression: float = 0.5
    num_classes: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        x = Conv(2 * self.growth, (7, 7), strides=(2, 2), use_bias=False, impl=self.conv_impl,
                 name="stem")(x)
        x = _pool2(nn.relu(bn("stem_bn")(x)))
        for b, n in enumerate(self.blocks):
            for i in range(n):
                y = nn.relu(bn(f"block{b}_{i}_bn1")(x))
                y = Conv(self.bottleneck * self.growth, (1, 1), use_bias=False,
                         impl=self.conv_impl, name=f"block{b}_{i}_conv1")(y)
                y = nn.relu(bn(f"block{b}_{i}_bn2")(y))
                y = Conv(self.growth, (3, 3), use_bias=False, impl=self.conv_impl,
                         name=f"block{b}_{i}_conv2")(y)
                x = jnp.concatenate([x, y], axis=-1)
            if b < len(self.blocks) - 1:
                x = nn.relu(bn(f"transition{b}_bn")(x))
                x = Conv(int(x.shape[-1] * self.compression), (1, 1), use_bias=False,
                         impl=self.conv_impl, name=f"transition{b}")(x)
                x = _avg_pool2(x) if min(x.shape[1:3]) >= 2 else x
        x = nn.relu(bn("final_bn")(x))
        return nn.Dense(self.num_classes, name="out")(jnp.mean(x, axis=(1, 2)))
