"""Xie (arXiv 1807.05972, 2018): single-stage 3D nodule detector, ResNet + FPN with RReLU.

The network is only the trainable part (as in MONAI's ``monai.apps.detection`` split):
it maps a patch to raw per-anchor outputs. Anchors, target assignment, losses, decoding
and NMS live in ``lungjax.tasks.anchors``.

Layout (channels-last, spatial order (z, y, x); ``s`` = stride w.r.t. the input):

  ==========  =====================================================  ======  ============
  level       layers                                                 stride  channels
  ==========  =====================================================  ======  ============
  stem        conv 3^3 - norm - RReLU                                1       stem
  stage k     ``stage_blocks[k]`` residual blocks, the first with     2^(k+1) stage[k]
              stride 2 (and a 1^3 projection shortcut)
  top         conv 1^3 of the last stage                              2^K     fpn
  top-down    per level, coarse to fine: up-convolution 2^3 stride   halves  fpn
              2; at the head strides ONLY, + lateral conv 1^3 of the
              stage output at that stride; then one residual block
  head        conv 3^3 - norm - RReLU - conv 1^3 to A * 5 outputs     head    A * 5
  ==========  =====================================================  ======  ============

Residual block (3D basic block of He et al. 2016): conv 3^3 - norm - RReLU - conv 3^3 -
norm, plus the shortcut (identity, or conv 1^3 - norm when stride or width change), then
RReLU. ``norm`` is batch norm (default; statistics in the ``batch_stats`` collection),
group norm or none; convolutions before a norm have no bias.

The paper fixes: residual 3D blocks, an FPN top-down path with lateral connections only at
the last two scales ("nodules (3-30 mm) are considered too small when down-sampled by x8 or
over"), an output head on each of those two scales, the tuple <noduleness, x, y, z, d> per
regression anchor, anchors A = 3, 5, 7, 10, 13, 17, 22, 30, 40 mm, and RReLU. It does not
give widths, depths, normalisation or which head carries which anchors. Our choices, all
attributes of :class:`XieFPN`:

* four stages (strides 2, 4, 8, 16) of widths 32, 64, 64, 96 with 2, 2, 3, 3 blocks; the
  strides 8 and 16 enlarge the context but carry no head and no lateral connection;
* heads at strides 2 and 4 (below x8; a 96^3 patch gives 48^3 and 24^3 proposal grids,
  the paper's example grid is 24^3);
* the small anchors 3, 5, 7, 10 mm on the stride-2 head and 13, 17, 22, 30, 40 mm on the
  stride-4 head: at stride 4 a 3 mm sphere whose centre falls between cells overlaps the
  nearest cell's 3 mm anchor with IoU < 0.1, so small nodules need the fine grid;
  ``anchors_mm`` may instead repeat all nine anchors on both heads;
* the noduleness logit's bias starts at log(p / (1 - p)) with p = ``prior_probability``
  (0.01; Lin et al. 2017) so the first OHEM steps are not swamped by easy negatives.

Outputs, one array per head in ``head_strides`` order: (B, D/s, H/s, W/s, A_s, 5) float32
with last axis (logit, dz, dy, dx, dd), the regression deltas of
``lungjax.tasks.anchors.encode``. Input D, H, W must be multiples of the coarsest stride
(16 by default).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lungjax.models.layers import BatchNorm, Conv, ConvTranspose
from lungjax.models.rrelu import RReLU
from lungjax.registry import MODELS

#: The paper's regression anchors (mm).
PAPER_ANCHORS_MM = (3.0, 5.0, 7.0, 10.0, 13.0, 17.0, 22.0, 30.0, 40.0)
#: Number of outputs per anchor: logit, dz, dy, dx, dd.
OUTPUTS_PER_ANCHOR = 5


class _Norm(nn.Module):
    """Batch norm, group norm or identity over the channel (last) axis."""

    kind: str
    groups: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "batch":
            return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype, name="bn")(x)
        if self.kind == "group":
            c = x.shape[-1]
            g = math.gcd(c, self.groups)  # a group count that divides the width
            return nn.GroupNorm(num_groups=g, epsilon=1e-5, dtype=self.dtype, name="gn")(x)
        if self.kind == "none":
            return x
        raise ValueError(f"XieFPN.norm must be 'batch', 'group' or 'none', got {self.kind!r}")


class ResidualBlock3D(nn.Module):
    """3D basic residual block: conv3-norm-act-conv3-norm + shortcut, act.

    Attributes:
      features: output channels.
      strides: stride of the first conv (and of the projection shortcut).
      norm, groups: see :class:`_Norm`.
      rrelu_lower, rrelu_upper: RReLU slope range; rrelu_stream: its rng stream.
      dtype, conv_impl: compute dtype and ``layers.Conv`` implementation.
    """

    features: int
    strides: int = 1
    norm: str = "batch"
    groups: int = 8
    rrelu_lower: float = 1.0 / 8.0
    rrelu_upper: float = 1.0 / 3.0
    rrelu_stream: str = "rrelu"
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        bias = self.norm == "none"
        act = RReLU(self.rrelu_lower, self.rrelu_upper, self.rrelu_stream)
        conv = lambda f, k, s, name: Conv(f, (k,) * 3, strides=s, use_bias=bias,  # noqa: E731
                                          dtype=self.dtype, impl=self.conv_impl, name=name)
        norm = lambda name: _Norm(self.norm, self.groups, self.dtype, name=name)  # noqa: E731
        h = conv(self.features, 3, self.strides, "conv1")(x)
        h = act(norm("norm1")(h, train), deterministic=not train)
        h = conv(self.features, 3, 1, "conv2")(h)
        h = norm("norm2")(h, train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm("proj_norm")(conv(self.features, 1, self.strides, "proj")(x), train)
        return act(h + x, deterministic=not train)


@MODELS.register("xie2018_fpn")
class XieFPN(nn.Module):
    """3D ResNet + FPN detector with two output heads (module docstring for the layout).

    Attributes:
      stem_features: width of the full-resolution stem conv.
      stage_features: width of each backbone stage; stage k has stride 2^(k+1).
      stage_blocks: residual blocks per stage (>= 1 each).
      fpn_features: width of the top-down path.
      head_features: width of the head's 3^3 conv.
      head_strides: strides of the levels that get a lateral connection and a head; each a
        backbone stride (2^(k+1)) below the coarsest one.
      anchors_mm: one tuple of anchor diameters (mm) per head, in ``head_strides`` order.
      norm: "batch", "group" or "none"; norm_groups: groups of group norm.
      rrelu_lower, rrelu_upper: RReLU slope range (mean slope at inference).
      rrelu_stream: rng stream of the training slopes ("rrelu"; the step must pass it).
      prior_probability: initial noduleness of every anchor (logit bias init).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and outputs stay float32.
      conv_impl: passed to ``lungjax.models.layers.Conv`` / ``ConvTranspose``.
    """

    stem_features: int = 16
    stage_features: Sequence[int] = (32, 64, 64, 96)
    stage_blocks: Sequence[int] = (2, 2, 3, 3)
    fpn_features: int = 64
    head_features: int = 64
    head_strides: Sequence[int] = (2, 4)
    anchors_mm: Sequence[Sequence[float]] = ((3.0, 5.0, 7.0, 10.0),
                                             (13.0, 17.0, 22.0, 30.0, 40.0))
    norm: str = "batch"
    norm_groups: int = 8
    rrelu_lower: float = 1.0 / 8.0
    rrelu_upper: float = 1.0 / 3.0
    rrelu_stream: str = "rrelu"
    prior_probability: float = 0.01
    dtype: Any = None
    conv_impl: str = "auto"

    # ------------------------------------------------------------------ geometry
    def backbone_strides(self) -> tuple[int, ...]:
        return tuple(2 ** (k + 1) for k in range(len(self.stage_features)))

    def heads(self) -> tuple[tuple[int, tuple[float, ...]], ...]:
        """((stride, anchor diameters in mm), ...) per head, in output order; what
        ``lungjax.tasks.anchors.AnchorConfig`` is built from."""
        self._check()
        return tuple((int(s), tuple(float(a) for a in anc))
                     for s, anc in zip(self.head_strides, self.anchors_mm))

    def _check(self) -> None:
        strides = self.backbone_strides()
        if len(self.stage_features) != len(self.stage_blocks) or not self.stage_features:
            raise ValueError(f"XieFPN: stage_features {tuple(self.stage_features)} and "
                             f"stage_blocks {tuple(self.stage_blocks)} must be non-empty and "
                             "of equal length")
        if any(int(b) < 1 for b in self.stage_blocks):
            raise ValueError(f"XieFPN.stage_blocks must be >= 1, got {tuple(self.stage_blocks)}")
        if len(self.head_strides) != len(self.anchors_mm) or not self.head_strides:
            raise ValueError(f"XieFPN: one anchor tuple per head needed; head_strides "
                             f"{tuple(self.head_strides)}, anchors_mm {len(self.anchors_mm)}")
        if len(set(self.head_strides)) != len(self.head_strides):
            raise ValueError(f"XieFPN.head_strides has repeats: {tuple(self.head_strides)}")
        for s in self.head_strides:
            if s not in strides[:-1]:
                raise ValueError(f"XieFPN.head_strides: {s} is not one of the backbone strides "
                                 f"below the coarsest, {strides[:-1]}")
        for anc in self.anchors_mm:
            if not anc or any(float(a) <= 0 for a in anc):
                raise ValueError(f"XieFPN.anchors_mm: every head needs positive diameters, "
                                 f"got {anc}")

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """Applies the detector.

        Args:
          x: (B, D, H, W, 1) float32 patch in [0, 1], (z, y, x) order; D, H, W multiples of
            the coarsest stride (16 by default).
          train: batch-norm batch statistics and random RReLU slopes (rng stream "rrelu").

        Returns:
          Tuple over heads (``head_strides`` order) of (B, D/s, H/s, W/s, A_s, 5) float32:
          per cell and anchor (logit, dz, dy, dx, dd).
        """
        self._check()
        if x.ndim != 5:
            raise ValueError(f"XieFPN expects (B, D, H, W, C) input, got shape {x.shape}")
        strides = self.backbone_strides()
        top = strides[-1]
        if any(n % top for n in x.shape[1:4]):
            raise ValueError(f"XieFPN: input spatial shape {x.shape[1:4]} must be a multiple "
                             f"of the coarsest stride {top}")
        dt = self.dtype
        if dt is not None:
            x = x.astype(dt)
        det = not train
        block_kw = dict(norm=self.norm, groups=self.norm_groups, rrelu_lower=self.rrelu_lower,
                        rrelu_upper=self.rrelu_upper,
                        rrelu_stream=self.rrelu_stream, dtype=dt, conv_impl=self.conv_impl)
        conv_kw = dict(dtype=dt, impl=self.conv_impl)
        bias = self.norm == "none"

        h = Conv(self.stem_features, (3, 3, 3), use_bias=bias, name="stem_conv", **conv_kw)(x)
        h = _Norm(self.norm, self.norm_groups, dt, name="stem_norm")(h, train)
        h = RReLU(self.rrelu_lower, self.rrelu_upper, self.rrelu_stream, name="stem_act")(
            h, deterministic=det)

        feats = {}
        for k, (f, n) in enumerate(zip(self.stage_features, self.stage_blocks)):
            for j in range(int(n)):
                h = ResidualBlock3D(int(f), 2 if j == 0 else 1, name=f"stage{k}_block{j}",
                                    **block_kw)(h, train)
            feats[strides[k]] = h

        p = Conv(self.fpn_features, (1, 1, 1), name="top", **conv_kw)(feats[top])
        outputs = {}
        s = top
        while s > min(self.head_strides):
            s //= 2
            p = ConvTranspose(self.fpn_features, (2, 2, 2), strides=(2, 2, 2),
                              name=f"up{s}", **conv_kw)(p)
            if s in self.head_strides:
                p = p + Conv(self.fpn_features, (1, 1, 1), name=f"lateral{s}",
                             **conv_kw)(feats[s])
            p = ResidualBlock3D(self.fpn_features, 1, name=f"td{s}_block", **block_kw)(p, train)
            if s in self.head_strides:
                outputs[s] = self._head(p, s, train)
        return tuple(outputs[s] for s in self.head_strides)

    def _head(self, p, stride: int, train: bool):
        i = list(self.head_strides).index(stride)
        a = len(self.anchors_mm[i])
        dt = self.dtype
        h = Conv(self.head_features, (3, 3, 3), use_bias=self.norm == "none", dtype=dt,
                 impl=self.conv_impl, name=f"head{stride}_conv")(p)
        h = _Norm(self.norm, self.norm_groups, dt, name=f"head{stride}_norm")(h, train)
        h = RReLU(self.rrelu_lower, self.rrelu_upper, self.rrelu_stream,
                  name=f"head{stride}_act")(h, deterministic=not train)
        prior = float(self.prior_probability)
        if not 0.0 < prior < 1.0:
            raise ValueError(f"XieFPN.prior_probability must be in (0, 1), got {prior}")
        logit0 = math.log(prior / (1.0 - prior))

        def bias_init(key, shape, dtype=jnp.float32):
            del key
            b = jnp.zeros((a, OUTPUTS_PER_ANCHOR), dtype).at[:, 0].set(logit0)
            return b.reshape(shape)

        # Small regression init: the first deltas are ~0, i.e. the anchors themselves.
        out = Conv(a * OUTPUTS_PER_ANCHOR, (1, 1, 1), dtype=dt, impl=self.conv_impl,
                   kernel_init=nn.initializers.normal(0.01), bias_init=bias_init,
                   name=f"head{stride}_out")(h)
        b, d, hh, w, _ = out.shape
        return out.reshape(b, d, hh, w, a, OUTPUTS_PER_ANCHOR).astype(jnp.float32)
