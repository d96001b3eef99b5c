"""Sathish et al. 2020 on the stages engine: lung masks as batch targets, the Turing-test
pairs, the configs, and the tiny method end to end (adversarial SUMNet on lung slices,
then LeNet on lung patches; rerun skips, evaluate)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import stages, train
from lungjax.data import pipeline as pl
from lungjax.data import sampler as smp
from lungjax.methods.sathish2020 import turing_pairs
from test_dense_targets import config as dense_config
from test_dense_targets import make_dense_store

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def method(arg="tiny"):
    return _load(ROOT / "configs" / "sathish2020.py").get_config(arg)


# ---------------------------------------------------------------------------------
# Data: the lung mask as "mask", opt-in
# ---------------------------------------------------------------------------------


def test_lung_mask_target_is_the_stored_lung_under_the_same_crop(tmp_path):
    store = make_dense_store(str(tmp_path / "st"))
    cfg = dense_config(patch=(12, 12))
    cfg.augment = dict(positive=dict(), negative=dict())  # centres stay where sampled
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=3)

    def read(targets):
        return list(iter(pl.build_train_dataset(cfg, store, index, seed=3, targets=targets)))

    nodules = read(pl.Targets(mask=True))
    lung = read(pl.Targets(mask=True, mask_array="lung"))
    assert pl.Targets.from_config(method()).mask_array == "lung"
    assert pl.Targets().mask_array == "nodules"  # the default batches are unchanged
    n = 0
    for b_nod, b_lung, rows in zip(nodules, lung,
                                   np.split(index.samples, len(index.samples) // 4)):
        for k in b_nod:  # same draws: every other key bit-identical
            if k != "mask":
                np.testing.assert_array_equal(b_nod[k], b_lung[k], err_msg=k)
        for mask, row in zip(b_lung["mask"], rows):
            centre = np.rint(row["center_zyx"]).astype(int)
            want = store.read_patch(index.uids[row["scan"]], centre, (1, 12, 12), "lung")[0]
            np.testing.assert_array_equal(mask, (want > 0.5).astype(np.uint8))
            n += 1
    assert n and any(b["mask"].any() and not b["mask"].all() for b in lung)
    with pytest.raises(ValueError, match="batch_mask_array"):
        pl.Targets(mask=True, mask_array="heart")


# ---------------------------------------------------------------------------------
# The Turing-test pairs
# ---------------------------------------------------------------------------------


def test_turing_pairs_put_the_truth_in_the_labelled_channel():
    truth = jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2))])
    pred = jnp.full((3, 2, 2), 0.25)
    pairs, labels = turing_pairs(truth, pred, jax.random.PRNGKey(0))
    assert pairs.shape == (3, 2, 2, 2) and labels.shape == (3, 2)
    for i in range(3):
        k = int(np.argmax(labels[i]))
        np.testing.assert_array_equal(pairs[i, ..., k], truth[i])
        np.testing.assert_array_equal(pairs[i, ..., 1 - k], pred[i])
    np.testing.assert_array_equal(np.sum(labels, -1), 1.0)
    # the order is drawn per slice: both orders occur over a larger batch
    _, many = turing_pairs(jnp.zeros((64, 1, 1)), jnp.ones((64, 1, 1)), jax.random.PRNGKey(1))
    assert 0 < float(jnp.sum(many[:, 0])) < 64


# ---------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["tiny", "", "paper", "tiny,fold=2,steps=3,steps2=5"])
def test_variants_are_complete(arg):
    c = method(arg)
    train.validate_config(c)
    assert c.train.step == "turing_test" and c.sathish2020.alpha == 0.001
    assert c.optimizer.learning_rate == 1e-4 and c.data.batch_mask_array == "lung"
    assert c.networks.discriminator.model.name == "sathish2020_turing"
    specs = dict(stages.stage_specs(c))
    assert list(specs) == ["seg", "cls"]
    cls = stages.stage_config(c, "cls", specs["cls"])
    assert cls.model.name == "sathish2020_lenet" and not cls.networks
    assert tuple(cls.data.patch_size_zyx) == (64, 64) and cls.train.step == "supervised"
    if arg == "paper":
        assert tuple(c.data.patch_size_zyx) == (512, 512) and c.model.features == 64
    if "fold=2" in arg:
        assert (c.data.fold, c.train.num_steps, cls.train.num_steps) == (2, 3, 5)


@pytest.mark.parametrize("name,model", [("unet", "sathish2020_unet"),
                                        ("r2unet", "sathish2020_r2unet"),
                                        ("sumnet", "sathish2020_sumnet")])
def test_baselines_are_the_segmenter_alone(name, model):
    c = _load(ROOT / "configs" / "baselines" / f"sathish2020_{name}.py").get_config("tiny")
    train.validate_config(c)
    assert c.model.name == model and c.train.step == "supervised" and not c.networks
    assert c.stage_order == ("seg",) and c.name == f"sathish2020_{name}"


def test_config_rejects_unknown_args():
    with pytest.raises(ValueError, match="unknown config arg 'colour'"):
        method("tiny,colour=red")
    with pytest.raises(ValueError, match="unknown variant"):
        method("huge")


# ---------------------------------------------------------------------------------
# The tiny method end to end
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data_cache):
    root = tmp_path_factory.mktemp("sathish2020")
    c = method("tiny")
    c.data.cache_dir = tiny_data_cache
    record = stages.run("train", c, str(root / "run"))
    return c, root / "run", record


@pytest.mark.slow
def test_tiny_method_trains_both_stages_and_evaluates(tiny_run):
    c, run, rec = tiny_run
    assert rec["stage_order"] == ["seg", "cls"]
    seg, cls = rec["stages"]["seg"], rec["stages"]["cls"]
    assert seg["step"] == c.train.num_steps
    for key in ("segmenter/loss", "segmenter/seg_loss", "segmenter/adv_loss",
                "discriminator/loss", "discriminator/accuracy"):
        assert np.isfinite(seg["train"][key]), key
    ev = seg["eval/seg"]
    assert 0.0 <= ev["dice"] <= 1.0 and 0.0 <= ev["pixel_auc"] <= 1.0 and ev["hd_mm"] >= 0
    assert ev["count"] == c.data.eval_patches
    assert cls["step"] == c.stages.cls.sections.train.num_steps
    ev = cls["eval/cls"]
    for k in ("accuracy", "specificity"):
        assert ev[f"{k}_lo"] <= ev[k] <= ev[f"{k}_hi"]
    # the segmenter and its adversary were checkpointed under their names; the
    # classifier in its own folder
    from lungjax.checkpointing import restore_params

    for net in ("segmenter", "discriminator"):
        assert restore_params(run / "seg" / "checkpoints", network=net)["network"] == net
    cfg = json.loads((run / "cls" / "config.json").read_text(encoding="utf-8"))
    assert cfg["model"]["name"] == "sathish2020_lenet" and cfg["data"]["batch_mask"] is False


@pytest.mark.slow
def test_tiny_method_rerun_skips_and_evaluate_reuses_the_trained_stages(tiny_run, capsys):
    c, run, rec = tiny_run
    again = stages.run("train", c, str(run))
    out = capsys.readouterr().out
    assert "seg: done" in out and "cls: done" in out
    assert again["stages"]["seg"]["eval/seg"] == rec["stages"]["seg"]["eval/seg"]
    evaluated = stages.run("evaluate", c, str(run))
    assert evaluated["stages"]["cls"]["eval/cls"] == rec["stages"]["cls"]["eval/cls"]
