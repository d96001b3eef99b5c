"""Dou et al. (MICCAI 2017) stage 2: the hybrid-loss 3D residual false-positive reduction net.

Input: a 60x60x24 (x, y, z) patch centred on a stage-1 candidate, i.e. our arrays
(B, 24, 60, 60, 1) in (z, y, x) channels-last, float in [0, 1]. Output: two-class logits
(nodule / not) and, for the hybrid-loss variant, the 4 regression values of
``lungjax.tasks.hybrid`` (order (z, y, x, log-diameter)).

What the paper states, and how it appears here:

* "3D residual unit x_out = x_in + F(x_in, {W_k}); F is a stack of convolutional, batch
  normalization and ReLU layers"; "the convolutions in the residual units used padding to
  maintain the dimension": ``ResidualUnit3D``, F = BN-ReLU-conv(3x3x3, SAME)-BN-ReLU-
  conv(3x3x3, SAME): the pre-activation order of the same group's VoxResNet (Chen, Dou et
  al.), which matches x_out = x_in + F(x_in) with nothing applied after the sum.
* "the first three convolutional layers were initialized from the FCN model": conv1, the
  (1, 2, 2) max-pool and conv2, conv3 copy the stage-1 FCN's first layers exactly (kernels,
  channels, VALID padding, ReLU, no normalisation; ``lungjax.models.fcn``), so
  ``init_from_fcn`` can copy their parameters.
* "a classification branch and a regression branch, by sharing the parameters in early
  layers": the regression branch leaves after the first residual stage; classification
  goes on through a second, strided residual stage.
* the rest "randomly initialized as in [5]" (He et al.): He-normal kernels; conv1-3 use
  the FCN's N(0, 0.01) (``init_std``) when trained from scratch.

Where the paper is silent (its figure with the layer sizes is not in the text we have) the
layout is ours, chosen to be small enough for CPU training:

  ===========  ======================================  ===============  =================
  layer        op (kernel z,y,x)                       channels         output on 24x60x60
  ===========  ======================================  ===============  =================
  conv1        conv (3,5,5) VALID + ReLU               64               (22, 56, 56)
  pool1        max-pool (1,2,2) stride (1,2,2)         -                (22, 28, 28)
  conv2        conv (3,5,5) VALID + ReLU               64               (20, 24, 24)
  conv3        conv (3,5,5) VALID + ReLU               150              (18, 20, 20)
  conv4        conv (3,3,3) VALID                      64               (16, 18, 18)
  res1         residual unit (2 x conv 3x3x3 SAME)     64               (16, 18, 18)
  bn1          BN + ReLU (shared by both branches)     64               (16, 18, 18)
  -- classification branch --
  conv5        conv (3,3,3) stride 2 VALID             128              (7, 8, 8)
  res2         residual unit                           128              (7, 8, 8)
  bn2          BN + ReLU                               128              (7, 8, 8)
  pool2        max-pool (2,2,2) stride 2, flatten      6144             (3, 4, 4)
  cls_fc1      dense + ReLU                            128
  cls_fc2      dense -> logits                         2
  -- regression branch (hybrid loss only) --
  reg_conv     conv (3,3,3) stride 2 VALID + ReLU      32               (7, 8, 8)
  reg_fc1      dense + ReLU (on the flattened 14336)   128
  reg_fc2      dense -> (T_z, T_y, T_x, T_d)           4
  ===========  ======================================  ===============  =================

Both heads flatten (instead of pooling globally) so the dense layers see where things sit
in the patch; the regression branch keeps the finer (7, 8, 8) grid because its offset
targets measure exactly that, the classification branch pools once more to keep its
dense layer small (0.79 M parameters; 3.41 M in all without the regression branch,
5.30 M with it).

Ablations (Table 2 of the paper), as registered models:

* ``dou2017_fpr_deepnet`` ("DeepNet"): the same layers with the identity shortcuts removed
  and no regression branch;
* ``dou2017_fpr_resnet`` ("ResNet"): residual, classification only;
* ``dou2017_fpr_resnet_hl`` ("ResNet+HL"): residual + regression branch, trained with
  ``lungjax.tasks.hybrid``.

Classification-only variants return logits (B, 2); the hybrid variant returns
``{"logits": (B, 2), "regression": (B, 4)}`` (both float32).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models.layers import BatchNorm, Conv, max_pool
from lungjax.registry import MODELS

PATCH_SIZE_ZYX = (24, 60, 60)
# Layers shared with the stage-1 FCN (same names there), copied by ``init_from_fcn``.
FCN_SHARED_LAYERS = ("conv1", "conv2", "conv3")
# The same as ``config.train.init_paths`` pairs ("src:dst") for the engine's transfer.
FCN_TRANSFER_PATHS = tuple(f"{n}:{n}" for n in FCN_SHARED_LAYERS)
VARIANTS = ("deepnet", "resnet", "resnet_hl")

_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class ResidualUnit3D(nn.Module):
    """x_out = x_in + F(x_in), F = BN-ReLU-conv-BN-ReLU-conv (3x3x3, SAME padding).

    With ``residual=False`` the identity shortcut is dropped (x_out = F(x_in)): the plain
    "DeepNet" ablation with otherwise identical layers and parameter count.

    Attributes:
      features: channels of both convolutions (equal to the input's, so the sum is valid).
      residual: keep the identity shortcut.
      kernel_size: (z, y, x) kernel of both convolutions.
      bn_momentum: running-statistics decay of the batch norms.
      dtype: computation dtype; parameters stay float32.
      conv_impl: ``lungjax.models.layers.Conv`` implementation.
    """

    features: int
    residual: bool = True
    kernel_size: Sequence[int] = (3, 3, 3)
    bn_momentum: float = 0.9
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """(B, D, H, W, features) -> (B, D, H, W, features)."""
        if x.shape[-1] != self.features:
            raise ValueError(f"ResidualUnit3D({self.features}) got {x.shape[-1]} input channels")
        h = x
        for i in (1, 2):
            h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(h)
            h = nn.relu(h)
            h = Conv(self.features, tuple(self.kernel_size), padding="SAME",
                     kernel_init=_he_normal, dtype=self.dtype, impl=self.conv_impl,
                     name=f"conv{i}")(h)
        return x + h if self.residual else h


class Dou2017FPR(nn.Module):
    """The stage-2 network (layer table in the module docstring).

    Attributes:
      trunk_features: channels of conv1..conv3 (must equal the FCN's first three).
      trunk_kernels: (z, y, x) kernels of conv1..conv3 (must equal the FCN's).
      stage_features: channels of (conv4 + res1, conv5 + res2).
      reg_features: channels of the regression branch's strided conv.
      fc_features: width of the hidden dense layer of each head.
      num_classes: classification outputs (2).
      num_regression: regression outputs (4: z, y, x, log-diameter).
      residual: identity shortcuts in the residual units (False = "DeepNet").
      regression: build the regression branch (True = "ResNet+HL").
      init_std: std of the N(0, std) initialiser of conv1..conv3 (the FCN's); 0 or None
        uses He-normal like the deeper layers.
      bn_momentum: running-statistics decay.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters and outputs float32.
      conv_impl: passed to every ``Conv``.
    """

    trunk_features: Sequence[int] = (64, 64, 150)
    trunk_kernels: Sequence[Sequence[int]] = ((3, 5, 5), (3, 5, 5), (3, 5, 5))
    stage_features: Sequence[int] = (64, 128)
    reg_features: int = 32
    fc_features: int = 128
    num_classes: int = 2
    num_regression: int = 4
    residual: bool = True
    regression: bool = True
    init_std: float | None = 0.01
    bn_momentum: float = 0.9
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Applies the network.

        Args:
          x: (B, D, H, W, 1) float image in [0, 1], (z, y, x) spatial order; the layout is
            designed for (24, 60, 60) and needs at least (13, 34, 34) (the last max-pool
            needs 2 voxels after the strided convolution). Apply with the shape used at
            ``init``: the dense layers fix the flattened size.
          train: batch statistics in the batch norms (and update of their running means,
            so apply with ``mutable=["batch_stats"]``); False uses the running averages.

        Returns:
          (B, num_classes) float32 logits, or for ``regression=True`` a dict
          ``{"logits": (B, num_classes), "regression": (B, num_regression)}`` float32.
        """
        if x.ndim != 5:
            raise ValueError(f"Dou2017FPR expects (B, D, H, W, C) input, got shape {x.shape}")
        if len(self.trunk_features) != 3 or len(self.trunk_kernels) != 3:
            raise ValueError("Dou2017FPR: trunk_features and trunk_kernels need 3 entries "
                             "(conv1..conv3), got "
                             f"{len(self.trunk_features)} and {len(self.trunk_kernels)}")
        if len(self.stage_features) != 2:
            raise ValueError(f"Dou2017FPR: stage_features needs 2 entries, got "
                             f"{tuple(self.stage_features)}")
        dtype = self.dtype
        if dtype is not None:
            x = x.astype(dtype)
        trunk_init = (nn.initializers.normal(self.init_std) if self.init_std else _he_normal)

        def conv(h, f, k, name, strides=1, padding="VALID", init=_he_normal):
            return Conv(f, tuple(k), strides=strides, padding=padding, kernel_init=init,
                        dtype=dtype, impl=self.conv_impl, name=name)(h)

        def bn_relu(h, name):
            return nn.relu(BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                        epsilon=1e-5, dtype=dtype, name=name)(h))

        def dense(h, f, name):
            return nn.Dense(f, kernel_init=_he_normal, dtype=dtype, name=name)(h)

        f1, f2, f3 = self.trunk_features
        k1, k2, k3 = self.trunk_kernels
        s1, s2 = self.stage_features
        # Shared trunk = the stage-1 FCN's first layers (same names, same order).
        h = nn.relu(conv(x, f1, k1, "conv1", init=trunk_init))
        h = max_pool(h, (1, 2, 2))
        h = nn.relu(conv(h, f2, k2, "conv2", init=trunk_init))
        h = nn.relu(conv(h, f3, k3, "conv3", init=trunk_init))
        # No activation here: the pre-activation unit starts with BN-ReLU.
        h = conv(h, s1, (3, 3, 3), "conv4")
        h = ResidualUnit3D(s1, self.residual, bn_momentum=self.bn_momentum, dtype=dtype,
                           conv_impl=self.conv_impl, name="res1")(h, train)
        shared = bn_relu(h, "bn1")

        c = conv(shared, s2, (3, 3, 3), "conv5", strides=2)
        c = ResidualUnit3D(s2, self.residual, bn_momentum=self.bn_momentum, dtype=dtype,
                           conv_impl=self.conv_impl, name="res2")(c, train)
        c = bn_relu(c, "bn2")
        c = max_pool(c, (2, 2, 2))
        c = nn.relu(dense(c.reshape(c.shape[0], -1), self.fc_features, "cls_fc1"))
        logits = dense(c, self.num_classes, "cls_fc2").astype(jnp.float32)
        if not self.regression:
            return logits

        r = nn.relu(conv(shared, self.reg_features, (3, 3, 3), "reg_conv", strides=2))
        r = nn.relu(dense(r.reshape(r.shape[0], -1), self.fc_features, "reg_fc1"))
        reg = dense(r, self.num_regression, "reg_fc2").astype(jnp.float32)
        return {"logits": logits, "regression": reg}


_VARIANT_FLAGS = {
    "deepnet": dict(residual=False, regression=False),
    "resnet": dict(residual=True, regression=False),
    "resnet_hl": dict(residual=True, regression=True),
}


def build_fpr_model(name: str, **kw) -> Dou2017FPR:
    """The stage-2 network for an ablation name.

    Args:
      name: "deepnet", "resnet" or "resnet_hl" (optionally prefixed "dou2017_fpr_").
      **kw: other ``Dou2017FPR`` attributes (widths, dtype, conv_impl, ...).
    """
    key = name[len("dou2017_fpr_"):] if name.startswith("dou2017_fpr_") else name
    if key not in _VARIANT_FLAGS:
        raise ValueError(f"unknown stage-2 network {name!r}; known: {', '.join(VARIANTS)}")
    clash = sorted(set(kw) & set(_VARIANT_FLAGS[key]))
    if clash:
        raise ValueError(f"stage-2 network {name!r} fixes {clash}; pick another variant instead")
    return Dou2017FPR(**_VARIANT_FLAGS[key], **kw)


def _register(variant: str) -> Callable[..., Dou2017FPR]:
    def build(**kw) -> Dou2017FPR:
        return build_fpr_model(variant, **kw)

    build.__name__ = f"dou2017_fpr_{variant}"
    build.__doc__ = f"``Dou2017FPR`` as the paper's {variant!r} network (``build_fpr_model``)."
    return MODELS.register(f"dou2017_fpr_{variant}", build)


for _v in VARIANTS:
    _register(_v)


def init_from_fcn(fpr_params: Mapping[str, Any], fcn_params: Mapping[str, Any],
                  layers: Sequence[str] = FCN_SHARED_LAYERS) -> dict:
    """Copies the stage-1 FCN's first convolutions into stage-2 parameters.

    Args:
      fpr_params: the ``params`` collection of a ``Dou2017FPR`` (nested dict / FrozenDict).
      fcn_params: the ``params`` collection of a trained ``Dou2017FCN``.
      layers: top-level layer names present in both ("conv1", "conv2", "conv3").

    Returns:
      A new params dict: ``layers`` taken from ``fcn_params`` (as new arrays), every other
      leaf the same object as in ``fpr_params`` (``fpr_params`` is not modified).

    Raises:
      KeyError: a layer is missing from either tree (message names it).
      ValueError: a layer's parameter shapes or names differ (message names the layer and
        both shapes), e.g. an FCN trained with other widths than ``trunk_features``.
    """
    out = dict(flax.core.unfreeze(fpr_params))
    fcn = flax.core.unfreeze(fcn_params)
    for name in layers:
        if name not in out:
            raise KeyError(f"init_from_fcn: layer {name!r} not in the stage-2 parameters "
                           f"(has {sorted(out)})")
        if name not in fcn:
            raise KeyError(f"init_from_fcn: layer {name!r} not in the FCN parameters "
                           f"(has {sorted(fcn)})")
        dst_shapes = jax.tree_util.tree_map(np.shape, out[name])
        src_shapes = jax.tree_util.tree_map(np.shape, fcn[name])
        if dst_shapes != src_shapes:
            raise ValueError(f"init_from_fcn: layer {name!r} does not match: FCN {src_shapes} "
                             f"vs stage-2 {dst_shapes} (train both with the same "
                             "trunk_features / kernels)")
        out[name] = jax.tree_util.tree_map(jnp.array, fcn[name])
    return out
