"""Shrey et al. 2020: the 2D U-Net that screens axial slices for nodules and the small
convolutional classifier that calls a nodule benign or malignant from its image and the
U-Net's predicted mask.

All arrays are channels-last, 2D: slices and crops (B, H, W, C) float32, image intensities
in [0, 1]. H and W must be multiples of 16 wherever the U-Net runs (four 2x2 max-pools).

* ``UNet2D``: five encoder stages of two 3x3 convolutions + ReLU (64 channels doubling:
  64, 128, 256, 512, 1024 at the paper's width), 50% dropout after the last two stages, a
  2x2 max-pool between stages, then four 2x2 up-convolutions, each followed by
  concatenation with the encoder stage of the same size and two 3x3 convolutions; a 1x1
  convolution gives two-class logits (background, nodule) for a softmax.
  The paper counts "a max-pool after each" of five encoder layers and four
  up-convolutions; five pools would leave the decoder one level short of the input size,
  so the fifth stage is the bottleneck (the layout of the original U-Net, whose last two
  encoder stages also carry the 50% dropout).
* ``Shrey2020UNet`` (MODELS "shrey2020_unet"): the segmentation network of the
  "unet" stage: (B, H, W, 1) -> (B, H, W, 2) logits; its U-Net sits under the module name
  "unet", so the classifier stage copies it with ``init_paths=("unet:unet",)``.
* ``Shrey2020Classifier`` (MODELS "shrey2020_classifier"): three 3x3 convolutions + ReLU
  (8 channels doubling), each followed by a 2x2 max-pool, 50% dropout after the last,
  FC 128 + ReLU, FC 2: (B, H, W, C) -> (B, 2) logits (benign, malignant).
* ``Shrey2020Cascade`` (MODELS "shrey2020_cascade"): the classifier stage's network. The
  trained U-Net (frozen: its output passes ``stop_gradient``, so Adam's update of its
  parameters is exactly zero) predicts the nodule mask of the crop; the classifier named
  by ``classifier`` (ours or a baseline of ``lungjax.models.classifiers2d``) sees the
  two channels {image, predicted mask}: (B, H, W, 1) -> (B, 2) logits.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lungjax.models.layers import Conv, ConvTranspose, max_pool
from lungjax.registry import MODELS


class UNet2D(nn.Module):
    """(B, H, W, C) -> (B, H, W, num_classes) logits; H, W multiples of
    2 ** (len(features) - 1).

    Attributes:
      features: channels of the encoder stages (the last is the bottleneck).
      dropout: rate applied after each of the last ``dropout_stages`` encoder stages.
      dropout_stages: how many of the deepest encoder stages carry dropout.
      num_classes: output channels.
      conv_impl: ``layers.Conv`` implementation.
    """

    features: Sequence[int] = (64, 128, 256, 512, 1024)
    dropout: float = 0.5
    dropout_stages: int = 2
    num_classes: int = 2
    conv_impl: str = "auto"

    def _block(self, x, features: int, name: str):
        for i in range(2):
            x = nn.relu(Conv(features, (3, 3), impl=self.conv_impl, name=f"{name}_conv{i}")(x))
        return x

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = len(self.features)
        factor = 2 ** (n - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet2D: H, W = {x.shape[1:3]} must be multiples of {factor}")
        skips = []
        for i, f in enumerate(self.features):
            x = self._block(x, f, f"enc{i}")
            if i >= n - self.dropout_stages:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            if i < n - 1:
                skips.append(x)
                x = max_pool(x, (2, 2))
        for i, f in reversed(list(enumerate(self.features[:-1]))):
            x = nn.relu(ConvTranspose(f, (2, 2), strides=(2, 2), impl=_transpose_impl(
                self.conv_impl), name=f"up{i}")(x))
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = self._block(x, f, f"dec{i}")
        return Conv(self.num_classes, (1, 1), impl=self.conv_impl, name="logits")(x)


def _transpose_impl(conv_impl: str) -> str:
    # ConvTranspose knows fewer formulations than Conv; the per-pass ones fall back to auto.
    return conv_impl if conv_impl in ("auto", "xla", "matmul", "im2col") else "auto"


@MODELS.register("shrey2020_unet")
class Shrey2020UNet(nn.Module):
    """The screening U-Net: (B, H, W, 1) slices -> (B, H, W, 2) logits (background,
    nodule); see ``UNet2D`` for the attributes."""

    features: Sequence[int] = (64, 128, 256, 512, 1024)
    dropout: float = 0.5
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return UNet2D(tuple(self.features), self.dropout, conv_impl=self.conv_impl,
                      name="unet")(x, train)


@MODELS.register("shrey2020_classifier")
class Shrey2020Classifier(nn.Module):
    """(B, H, W, C) crop -> (B, num_classes) logits.

    Attributes:
      features: channels of the three 3x3 convolutions (each followed by a 2x2 max-pool).
      dropout: rate after the last convolution stage.
      fc_features: width of the hidden fully connected layer.
      num_classes: output logits.
      conv_impl: ``layers.Conv`` implementation.
    """

    features: Sequence[int] = (8, 16, 32)
    dropout: float = 0.5
    fc_features: int = 128
    num_classes: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, f in enumerate(self.features):
            x = nn.relu(Conv(f, (3, 3), impl=self.conv_impl, name=f"conv{i}")(x))
            x = max_pool(x, (2, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.fc_features, name="fc")(x))
        return nn.Dense(self.num_classes, name="out")(x)


@MODELS.register("shrey2020_cascade")
class Shrey2020Cascade(nn.Module):
    """(B, H, W, 1) nodule crop -> (B, 2) logits (benign, malignant) from the crop and
    the frozen U-Net's predicted nodule mask.

    Attributes:
      unet_features: the U-Net's encoder widths (those of the trained "unet" stage).
      classifier: MODELS name of the classifier on the two-channel input.
      classifier_args: its constructor arguments (``conv_impl`` is added when it takes one).
      mask_threshold: nodule probability at which a pixel is in the predicted mask (the
        second channel is this 0/1 mask).
      conv_impl: ``layers.Conv`` implementation.
    """

    unet_features: Sequence[int] = (64, 128, 256, 512, 1024)
    classifier: str = "shrey2020_classifier"
    classifier_args: Any = None
    mask_threshold: float = 0.5
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        # The U-Net is a trained, fixed first stage: deterministic, no gradient.
        logits = UNet2D(tuple(self.unet_features), conv_impl=self.conv_impl,
                        name="unet")(x, False)
        prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:2]
        mask = jax.lax.stop_gradient((prob > self.mask_threshold).astype(x.dtype))
        args = dict(self.classifier_args or {})
        cls = MODELS.get(self.classifier)
        if "conv_impl" in getattr(cls, "__dataclass_fields__", {}):
            args.setdefault("conv_impl", self.conv_impl)
        return cls(name="classifier", **args)(jnp.concatenate([x, mask], axis=-1), train)
