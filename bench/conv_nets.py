"""The benchmark networks of ``bench/conv_vs_torch.py`` in Flax: lungjax's own models where
lungjax has the network, otherwise built on ``lungjax.models.layers`` (twins of
``bench/nets_torch.py``: same layers, same parameter counts). Channels-last; inputs
(B, D, H, W, 1) or (B, H, W, 1) float32.

* ``fcn``: lungjax's stage-1 3D FCN, ``lungjax.models.fcn.Dou2017FCN``, on 10x30x30 patches:
  conv64 (3,5,5), max-pool (1,2,2), conv64 (3,5,5), conv150 (3,5,5), conv150 (4,5,5),
  conv2 (1,1,1); ReLU; -> (B,1,1,1,2).
* ``fpr``: 3D residual false-positive-reduction net on 24x60x60: conv32 stem, six
  pre-activation residual units 32, 32, 64/2, 64, 128/2, 128 (BN-ReLU-conv3-BN-ReLU-conv3,
  1x1x1 projection when shape changes), BN-ReLU, global average pool, dense 2.
* ``det``: 3D ResNet+FPN detector on 96^3: conv24/2 stem, residual units 32/2 (C2), 64/2
  (C3), 128/2 (C4); FPN laterals to 64, 2x2x2 stride-2 transposed-conv up-sampling, heads
  (conv64 3^3, ReLU, conv 9 anchors x 5) on P2 (24^3) and P3 (12^3).
* ``unet``: 2D U-Net on 256^2, 64..1024 channels, double conv3x3+BN+ReLU, max-pool 2,
  2x2 stride-2 up-convolutions, concatenation skips, 1x1 conv to 2 classes.
* ``dou2017_fpr``: lungjax's own stage-2 network, ``lungjax.models.fp_reduction.Dou2017FPR`` as
  ResNet+HL (the paper's trunk 64-64-150 with (3,5,5) kernels, two residual stages,
  classification and regression heads) on 24x60x60; the loss sums both heads.
* ``sumnet_adv``: sathish2020's segmentation stage as lungjax trains it, at the paper's
  widths on 256x256 slices: SUMNet and its Turing-test discriminator (pools (2, 2, 2, 2),
  final kernel 7 at this size) in lungjax's own alternating step
  (``lungjax.train.build_engine`` on ``configs/sathish2020.py:paper``: one discriminator
  update, then one segmenter update on J_seg - alpha J_adv; Adam 1e-4 each).
* ``res_unet3d``: lungjax's yu2021 3D Res U-Net (``lungjax.models.yu2021.ResUNet3D``) at
  the paper's width (base 32, bottom 512) on 32x64x64 crops, batch 2 (the paper's
  sub-case, 48x192x192 in batches of 6, is 18x the voxels).
* ``resnet50_3d``: lungjax's yu2021 3D ResNet50 (``lungjax.models.yu2021.ResNet3D``, the
  paper's version) on the paper's 16x48x48 ROIs, batch 4 (the paper's 16 is four times
  the work per step).
* ``sathish_unet``: lungjax's ``sathish2020_unet`` (the paper's U-Net baseline: conv-BN-ReLU
  blocks, nearest up-sampling + conv) on 256x256, 2-class output, the MSE loss above.
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax.models.fcn import Dou2017FCN
from lungjax.models.fp_reduction import Dou2017FPR
from lungjax.models.layers import BatchNorm, Conv, ConvTranspose, max_pool
from lungjax.models.yu2021 import ResNet3D, ResUNet3D

N_ANCHORS = 9
# The detector's total down-sampling: a whole-volume edge it runs over is a multiple of it.
SCAN_STRIDE = 16
PAUSE_S = 0.5  # between timed blocks, untimed: the other framework's idle threads stop spinning


def interleaved_times(runs: dict, steps: int, warmup: int, rounds: int) -> dict:
    """Step seconds of each function in ``runs``, in ``rounds`` alternating blocks.

    Args:
      runs: {label: function running one step}.
      steps: timed steps per block; warmup: untimed steps before each label's first block.

    Returns:
      {label: [seconds per round: [step seconds] * steps] * rounds}.
    """
    times = {label: [] for label in runs}
    for r in range(rounds):
        for label, run in runs.items():
            if rounds > 1 or len(runs) > 1:
                time.sleep(PAUSE_S)
            if r == 0:
                for _ in range(warmup):
                    run()
            block = []
            for _ in range(steps):
                t0 = time.perf_counter()
                run()
                block.append(time.perf_counter() - t0)
            times[label].append(block)
    return times


def median_seconds(fn, steps: int, warmup: int) -> float:
    """Median seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    return statistics.median(interleaved_times({"fn": fn}, steps, warmup, 1)["fn"][0])


def _bn(train):
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class ResUnit(nn.Module):
    """Pre-activation residual unit (3D)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.relu(_bn(train)(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = Conv(self.features, (1, 1, 1), strides=self.stride, use_bias=False)(h)
        h = Conv(self.features, (3, 3, 3), strides=self.stride, use_bias=False)(h)
        h = nn.relu(_bn(train)(h))
        h = Conv(self.features, (3, 3, 3), use_bias=False)(h)
        return h + shortcut


class FPR(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = Conv(32, (3, 3, 3), use_bias=False)(x)
        for f, s in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
            x = ResUnit(f, s)(x, train)
        x = nn.relu(_bn(train)(x))
        x = jnp.mean(x, axis=(1, 2, 3))
        return nn.Dense(2)(x)


class Detector(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(_bn(train)(Conv(24, (3, 3, 3), strides=2, use_bias=False)(x)))  # 48^3
        c2 = ResUnit(32, 2)(x, train)  # 24^3
        c3 = ResUnit(64, 2)(c2, train)  # 12^3
        c4 = ResUnit(128, 2)(c3, train)  # 6^3
        p4 = Conv(64, (1, 1, 1))(c4)
        p3 = Conv(64, (1, 1, 1))(c3) + ConvTranspose(64, (2, 2, 2), strides=2)(p4)
        p2 = Conv(64, (1, 1, 1))(c2) + ConvTranspose(64, (2, 2, 2), strides=2)(p3)
        outs = []
        for p in (p2, p3):
            h = nn.relu(Conv(64, (3, 3, 3))(p))
            outs.append(Conv(N_ANCHORS * 5, (1, 1, 1))(h))
        return outs


class DoubleConv(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.relu(_bn(train)(Conv(self.features, (3, 3), use_bias=False)(x)))
        return x


class UNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        skips = []
        for f in (64, 128, 256, 512):
            x = DoubleConv(f)(x, train)
            skips.append(x)
            x = max_pool(x, (2, 2))
        x = DoubleConv(1024)(x, train)
        for f, skip in zip((512, 256, 128, 64), reversed(skips)):
            x = ConvTranspose(f, (2, 2), strides=2)(x)
            x = DoubleConv(f)(jnp.concatenate([skip, x], axis=-1), train)
        return Conv(2, (1, 1))(x)


def _sathish_unet():
    from lungjax.models.sathish2020 import UNet as SathishUNet

    return SathishUNet(num_classes=2, features=64)


# name -> (module factory, input shape (channels-last), batch); a factory of None is a
# stage trained by lungjax's own engine (``ENGINE_STEPS``).
NETS = {
    "fcn": (Dou2017FCN, (10, 30, 30, 1), 64),
    "fpr": (FPR, (24, 60, 60, 1), 16),
    "det": (Detector, (96, 96, 96, 1), 2),
    "unet": (UNet, (256, 256, 1), 2),
    "dou2017_fpr": (lambda: Dou2017FPR(regression=True), (24, 60, 60, 1), 16),
    "sathish_unet": (_sathish_unet, (256, 256, 1), 2),
    "res_unet3d": (lambda: ResUNet3D(base_features=32), (32, 64, 64, 1), 2),
    "resnet50_3d": (ResNet3D, (16, 48, 48, 1), 4),
    "sumnet_adv": (None, (256, 256, 1), 2),
}


def _sumnet_adv_engine(batch: int):
    """lungjax's engine for sathish2020's adversarial segmentation stage at the paper's
    widths on 256x256 slices; returns (engine, batch dict)."""
    import importlib.util
    import os

    from lungjax import train

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "sathish2020.py")
    spec = importlib.util.spec_from_file_location("sathish2020_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("paper")
    h, w = NETS["sumnet_adv"][1][:2]
    c.data.patch_size_zyx = (h, w)
    c.train.batch_size = batch
    # The paper's (3, 3, 3, 2) pools need 512x512; at 256 these leave a 7x7 map for the
    # last convolution, averaged as at any size other than the paper's.
    c.networks.discriminator.model.pools = (2, 2, 2, 2)
    engine = train.build_engine(c)
    rng = np.random.default_rng(0)
    image = rng.random((batch, h, w, 1), np.float32)
    mask = (rng.random((batch, h, w)) < 0.3).astype(np.float32)
    data = {"image": jnp.asarray(image), "mask": jnp.asarray(mask),
            "weight": jnp.ones((batch,), jnp.float32)}
    return engine, data


def param_count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def engine_train_step(name: str, batch: int):
    """The train step of a stage lungjax's engine runs (``NETS`` factory None).

    Returns:
      (jitted step, args, trainable parameter count): ``step(states, batch) -> (states,
      loss)``, args [states, batch].
    """
    engine, data = {"sumnet_adv": _sumnet_adv_engine}[name](batch)
    states = engine.state
    key = f"{engine.network}/loss"

    def step(states, data):
        states, metrics, _ = engine.train_step(states, data)
        return states, metrics[key]

    n = sum(param_count(states[k].params) for k in states)
    return jax.jit(step, donate_argnums=(0,)), [states, data], n


def loss_fn(name: str, out, target):
    """Same loss as the torch twin: mean squared error against a fixed random target,
    summed over the outputs of multi-output networks (lists, or dicts in key order)."""
    outs, targets = jax.tree.leaves(out), jax.tree.leaves(target)
    return sum(jnp.mean((o - t) ** 2) for o, t in zip(outs, targets))


def train_step(name: str, batch: int):
    """The benchmarks' train step of network ``name``: forward + backward (MSE ``loss_fn``
    against a fixed random target, batch statistics updated) + Adam, jitted with the
    parameters, batch statistics and optimiser state donated.

    Returns:
      (jitted step, args): ``step(*args) -> (params, batch_stats, opt_state, loss)``, args a
      list [params, batch_stats, opt_state, x (batch, *input shape) float32, target].
    """
    factory, shape, _ = NETS[name]
    model = factory()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    target = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), jnp.float32), out)
    tx = optax.adam(1e-3)

    def step(params, stats, opt_state, x, target):
        def loss(p):
            out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"])
            return loss_fn(name, out, target), upd.get("batch_stats", {})
        (l, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, l

    return jax.jit(step, donate_argnums=(0, 1, 2)), [params, stats, tx.init(params), x, target]
