"""Dou et al. (MICCAI 2017) stage-1 screening network: a small 3D fully convolutional net.

The paper gives "5 convolutional layers and 1 max-pooling layer" trained on 30x30x10
(x, y, z) patches (our arrays: (10, 30, 30) in (z, y, x)); its figure with the exact layer
sizes is lost in the text we have. We use the layout below, chosen so that one 10x30x30
patch maps to exactly one output cell with VALID padding everywhere (so the same network
runs fully-convolutionally over a whole scan and gives a score volume):

  ====  ==============  ==========  =================  ==================
  layer kernel (z,y,x)  channels    stride (z,y,x)     output on 10x30x30
  ====  ==============  ==========  =================  ==================
  conv1 (3, 5, 5)       64          1                  (8, 26, 26)
  pool  (1, 2, 2)       -           (1, 2, 2)          (8, 13, 13)
  conv2 (3, 5, 5)       64          1                  (6, 9, 9)
  conv3 (3, 5, 5)       150         1                  (4, 5, 5)
  conv4 (4, 5, 5)       150         1                  (1, 1, 1)
  conv5 (1, 1, 1)       2 (logits)  1                  (1, 1, 1)
  ====  ==============  ==========  =================  ==================

ReLU after conv1-4, no normalisation (the paper mentions none for this stage). Weights are
drawn from N(0, 0.01) as in the paper (``init_std``), biases start at zero.

Index mapping (the paper's reference [3]): output cell ``c`` (z, y, x) of the score
volume sees input voxels ``STRIDE * c + [0, RECEPTIVE_FIELD)``; its training label is the
patch centre, which with the store's patch convention (start = centre - size // 2) is
``STRIDE * c + OFFSET`` with ``OFFSET = RECEPTIVE_FIELD // 2 = (5, 15, 15)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lungjax.models.layers import Conv, max_pool
from lungjax.registry import MODELS

# Index mapping of the default layout, in array order (z, y, x).
PATCH_SIZE_ZYX = (10, 30, 30)
RECEPTIVE_FIELD_ZYX = (10, 30, 30)
STRIDE_ZYX = (1, 2, 2)
OFFSET_ZYX = (5, 15, 15)


def layer_specs(kernels: Sequence[Sequence[int]] = ((3, 5, 5), (3, 5, 5), (3, 5, 5), (4, 5, 5))):
    """Per-layer ``(kernel_zyx, stride_zyx, padding)`` in order, pool included.

    This is what ``lungjax.tasks.screening.output_mapping`` consumes to compute the
    score-cell -> voxel mapping; ``padding`` is 0 (VALID) for every layer.
    """
    k1, k2, k3, k4 = (tuple(k) for k in kernels)
    return [
        (k1, (1, 1, 1), 0),
        ((1, 2, 2), (1, 2, 2), 0),
        (k2, (1, 1, 1), 0),
        (k3, (1, 1, 1), 0),
        (k4, (1, 1, 1), 0),
        ((1, 1, 1), (1, 1, 1), 0),
    ]


def receptive_field(specs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(receptive field, total stride) per axis of a VALID-padded layer stack."""
    rf = [1, 1, 1]
    jump = [1, 1, 1]
    for kernel, stride, _ in specs:
        for a in range(3):
            rf[a] += (kernel[a] - 1) * jump[a]
            jump[a] *= stride[a]
    return tuple(rf), tuple(jump)


@MODELS.register("dou2017_fcn")
class Dou2017FCN(nn.Module):
    """The screening FCN.

    Attributes:
      features: channels of conv1..conv4.
      kernels: (z, y, x) kernels of conv1..conv4.
      num_classes: output channels of the final 1x1x1 conv (2: background / nodule).
      init_std: std of the N(0, std) kernel initialiser; 0 or None uses LeCun normal.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      conv_impl: passed to ``lungjax.models.layers.Conv`` (``"auto"`` picks the fastest).
    """

    features: Sequence[int] = (64, 64, 150, 150)
    kernels: Sequence[Sequence[int]] = ((3, 5, 5), (3, 5, 5), (3, 5, 5), (4, 5, 5))
    num_classes: int = 2
    init_std: float | None = 0.01
    dtype: Any = None
    conv_impl: str = "auto"

    def layer_specs(self):
        """(kernel, stride, padding) per layer, for the score-volume index mapping."""
        return layer_specs(self.kernels)

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Applies the network.

        Args:
          x: (B, D, H, W, 1) float image in [0, 1] (z, y, x spatial order); any D, H, W at
            least the receptive field (10, 30, 30).
          train: unused (no dropout / batch norm); kept for the common model signature.

        Returns:
          (B, D', H', W', num_classes) logits, float32, with
          D' = D - 9, H' = (H - 4) // 2 - 12 (and likewise W') for the default layout;
          a (10, 30, 30) patch gives (1, 1, 1).
        """
        del train
        if x.ndim != 5:
            raise ValueError(f"Dou2017FCN expects (B, D, H, W, C) input, got shape {x.shape}")
        init = (nn.initializers.normal(self.init_std) if self.init_std
                else nn.initializers.lecun_normal())
        dtype = self.dtype
        if dtype is not None:
            x = x.astype(dtype)

        def conv(h, f, k, name):
            return Conv(f, tuple(k), padding="VALID", kernel_init=init, dtype=dtype,
                        impl=self.conv_impl, name=name)(h)

        h = nn.relu(conv(x, self.features[0], self.kernels[0], "conv1"))
        h = max_pool(h, (1, 2, 2))
        h = nn.relu(conv(h, self.features[1], self.kernels[1], "conv2"))
        h = nn.relu(conv(h, self.features[2], self.kernels[2], "conv3"))
        h = nn.relu(conv(h, self.features[3], self.kernels[3], "conv4"))
        logits = conv(h, self.num_classes, (1, 1, 1), "conv5")
        return logits.astype(jnp.float32)
