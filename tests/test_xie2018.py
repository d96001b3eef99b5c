"""xie2018 pieces that need no training: configs (variants, heads, schedule, ablation),
every nodule of a patch in the batch (pipeline), and the ensemble's averaging."""

import importlib.util
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.data import augment as aug
from lungjax.data.pipeline import PatchTransform, PipelineConfig
from lungjax.data.sampler import NODULE, SAMPLE_DTYPE, SampleIndex
from lungjax.models.resnet_fpn import XieFPN
from lungjax.state import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model_kwargs(c):
    d = c.model.to_dict()
    d.pop("name")
    return d


@pytest.mark.parametrize("variant", ["tiny", "default", "paper"])
def test_config_variants(variant):
    from lungjax.train import validate_config

    c = _load(ROOT / "configs" / "xie2018.py").get_config(variant)
    validate_config(c)
    assert tuple(map(tuple, c.task.heads)) == XieFPN(**_model_kwargs(c)).heads()
    anchors = sorted(a for _, anc in c.task.heads for a in anc)
    assert anchors == [3.0, 5.0, 7.0, 10.0, 13.0, 17.0, 22.0, 30.0, 40.0]
    assert (c.task.pos_iou, c.task.neg_iou, c.task.ohem_k) == (0.3, 0.001, 5)
    spr, n = c.sampler.steps_per_round, c.train.num_steps
    assert 0 < spr < n and c.sampler.samples_per_round % c.train.batch_size == 0
    for size in c.data.patch_size_zyx:  # a multiple of the coarsest stride
        assert size % XieFPN(**_model_kwargs(c)).backbone_strides()[-1] == 0
    if variant == "paper":
        steps_per_epoch = c.sampler.samples_per_round // c.train.batch_size
        assert tuple(c.data.patch_size_zyx) == (96, 96, 96)
        assert n == 500 * steps_per_epoch and spr == 100 * steps_per_epoch  # t = 100
        assert c.optimizer.learning_rate == 1e-3 and c.optimizer.schedule == "plateau"
        assert c.optimizer.decay_factor == 0.1 and c.cv.folds == (0, 1, 2, 3, 4)
        # x0.1 three times on plateau: epoch-mean losses compared, floor after 3 decays.
        assert c.optimizer.plateau_accumulation_steps == steps_per_epoch
        assert c.optimizer.plateau_min_scale == pytest.approx(0.1 ** 3)
        make_optimizer(c.optimizer, n)  # every plateau field valid


def test_fixed_anchor_baseline_differs_only_in_sampling():
    main = _load(ROOT / "configs" / "xie2018.py").get_config("tiny")
    abl = _load(ROOT / "configs" / "baselines" / "xie2018_fixed_anchors.py").get_config("tiny")
    assert abl.sampler.update_anchors is False and main.sampler.update_anchors is True
    assert abl.name != main.name and not abl.cv.report
    for part in ("model", "task", "optimizer", "train", "data", "detection"):
        assert getattr(abl, part).to_dict() == getattr(main, part).to_dict(), part
    from lungjax import stages

    variant = stages.variant_config(main, "fixed_anchors")
    derived = stages.stage_config(variant, "detector",
                                  dict(stages.stage_specs(variant))["detector"])
    assert derived.sampler.to_dict() == abl.sampler.to_dict()


def test_bad_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'big'"):
        _load(ROOT / "configs" / "xie2018.py").get_config("big")


# ---------------------------------------------------------------------------------
# Every finding reaching into a patch is in the batch.
# ---------------------------------------------------------------------------------


class _Store:
    """A 64^3 volume with nodules A (centre), B and D (in the patch), C (outside)."""

    def __init__(self):
        self.volume = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
        self.rec = types.SimpleNamespace(
            spacing_zyx=(1.0, 1.0, 1.0),
            nodules_zyx=np.array([[32, 32, 32], [32, 32, 40], [32, 32, 50], [32, 32, 41.]]),
            nodule_diameter_mm=np.array([6.0, 4.0, 6.0, 6.0]),
            excluded_zyx=np.array([[30, 30, 30.]]), excluded_diameter_mm=np.array([-1.0]))

    def scan(self, uid):
        return self.rec

    def read_patch(self, uid, center, size, array="image"):
        start = np.asarray(center) - np.asarray(size) // 2
        pad = max(size)
        v = np.pad(self.volume, pad)
        s = start + pad
        return v[s[0]:s[0] + size[0], s[1]:s[1] + size[1], s[2]:s[2] + size[2]].copy()


def _transform(max_nodules, augment):
    row = np.zeros(1, SAMPLE_DTYPE)
    row["center_zyx"] = row["target_zyx"] = (32, 32, 32)
    row["diameter_mm"], row["label"], row["kind"], row["weight"] = 6.0, 1, NODULE, 1.0
    index = SampleIndex(row, ("u",), 0, 0, 1)
    acfg = aug.AugmentConfig(flip_axes=(0, 1, 2), rot90=True, scale_range=(0.8, 1.25))
    cfg = PipelineConfig(patch_size_zyx=(16, 16, 16), is_2d=False, batch_size=1,
                         max_nodules=max_nodules, augment_positive=acfg)
    return PatchTransform(_Store(), index, cfg, seed=3, process_index=0, process_count=1,
                          augment=augment), row[0]


def test_patch_lists_every_overlapping_nodule():
    t, row = _transform(3, augment=False)
    out = t.read(row, 0)
    # Patch voxels = stored voxels - (centre - size // 2); nearest the centre first; C
    # (x = 50, 11 mm beyond the patch's last voxel, radius 3) is left out, D (2 mm
    # beyond, radius 3) reaches in.
    np.testing.assert_allclose(out["nodules_zyx"], [[8, 8, 8], [8, 8, 16], [8, 8, 17]])
    np.testing.assert_allclose(out["nodules_diameter_mm"], [6, 4, 6])
    np.testing.assert_allclose(out["excluded_zyx"], [[6, 6, 6], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(out["excluded_diameter_mm"], [10, 0, 0])  # unknown = 10 mm
    t2, _ = _transform(2, augment=False)
    assert t2.read(row, 0)["nodules_zyx"].shape == (2, 3)
    t0, _ = _transform(0, augment=False)
    assert "nodules_zyx" not in t0.read(row, 0)


def test_patch_nodules_follow_the_augmentation():
    t, row = _transform(4, augment=True)
    for position in range(6):
        out = t.read(row, position)
        centre = out["offset_zyx"] + (16 - 1) / 2.0  # the anchor's own nodule
        d = out["nodules_diameter_mm"]
        k = int(np.argmin(np.linalg.norm(out["nodules_zyx"] - centre, axis=1)))
        np.testing.assert_allclose(out["nodules_zyx"][k], centre, atol=1e-4)
        assert d[k] == pytest.approx(out["diameter_mm"], rel=1e-5)
        scale = out["diameter_mm"] / 6.0
        # Distances between nodules scale with the zoom, whatever the flips / rotation.
        np.testing.assert_allclose(np.linalg.norm(out["nodules_zyx"][1] - out["nodules_zyx"][0]),
                                   8.0 * scale, rtol=1e-4)


# ---------------------------------------------------------------------------------
# Ensemble averaging.
# ---------------------------------------------------------------------------------


def test_ensemble_averages_probabilities_and_deltas():
    from lungjax.methods.xie2018 import ensemble_apply_fn, scan_apply_fn

    model = XieFPN(stem_features=2, stage_features=(2, 2, 2), stage_blocks=(1, 1, 1),
                   fpn_features=4, head_features=4, norm="none", conv_impl="xla")
    x = jnp.asarray(np.random.default_rng(1).random((1, 8, 8, 8, 1), np.float32))
    init = jax.jit(model.init)
    v1, v2 = init(jax.random.key(0), x), init(jax.random.key(1), x)
    single = jax.jit(scan_apply_fn(model))
    ensemble = jax.jit(ensemble_apply_fn(model))
    o1, o2 = single(v1, x), single(v2, x)
    ens = ensemble([v1, v2], x)
    for a, b, e in zip(o1, o2, ens):
        p = (jax.nn.sigmoid(a[..., 0]) + jax.nn.sigmoid(b[..., 0])) / 2
        np.testing.assert_allclose(jax.nn.sigmoid(e[..., 0]), p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e[..., 1:], (a[..., 1:] + b[..., 1:]) / 2, rtol=1e-5,
                                   atol=1e-6)
    same = ensemble([v1, v1], x)
    for a, e in zip(o1, same):
        np.testing.assert_allclose(e, a, rtol=1e-4, atol=1e-5)
