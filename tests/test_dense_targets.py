"""Dense targets and labels: nodule masks in the store (consensus or sphere, with their
source recorded), malignancy from the dataset through ScanRecord -> sampler -> batch,
masks transformed exactly as the image, balanced slice and nodule-ROI samplers, and
one-line errors naming the scan for bad labels."""

import numpy as np
import pytest

from conftest import run_config  # noqa: E402  (tests/ is on sys.path under pytest)
from lungjax.data import dense_sampling as ds
from lungjax.data import pipeline as pl
from lungjax.data import sampler as smp
from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.data.io import read_scan, write_scan
from lungjax.data.preprocess import sphere_labels
from lungjax.data.prepare import prepare_dataset
from lungjax.data.store import (STORE_FORMAT, STORE_VERSION, PatchStore, ScanRecord,
                                StoreError, read_manifest, write_manifest, write_scan_arrays)
from test_prepare import make_luna_folder

SHAPE = (20, 36, 36)


# ---------------------------------------------------------------------------------
# Sphere masks and preparation.
# ---------------------------------------------------------------------------------

def test_sphere_mask_has_the_annotated_volume_and_centre():
    spacing = np.array([1.25, 0.7, 0.7])
    centre = np.array([[20.3, 30.6, 29.2]])
    d = 12.0
    lab = sphere_labels((40, 60, 60), spacing, centre, [d], [7])
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 7}
    volume = (lab > 0).sum() * np.prod(spacing)
    assert volume == pytest.approx(4 / 3 * np.pi * (d / 2) ** 3, rel=0.03)
    c = np.rint(centre[0]).astype(int)
    assert lab[c[0], c[1], c[2]] == 7
    # Every set voxel lies within the radius (mm), and the ball is clipped at the border.
    z, y, x = np.nonzero(lab)
    dist = np.linalg.norm((np.stack([z, y, x], -1) - centre) * spacing, axis=1)
    assert dist.max() <= d / 2
    edge = sphere_labels((10, 10, 10), (1, 1, 1), [[0, 5, 5]], [6.0])
    full = sphere_labels((11, 10, 10), (1, 1, 1), [[5, 5, 5]], [6.0])
    assert edge[0, 5, 5] == 1
    np.testing.assert_array_equal(edge[:6], full[5:])


def _write_malignancy(root, rows):
    """The generated layout's malignancy.csv (the columns the store reads)."""
    ann = (root / "annotations.csv").read_text().splitlines()[1:]
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm,mask_label,malignancy"]
    for line in ann:
        uid, x, y, z, dmm = line.split(",")
        if uid in rows:
            label, score = rows[uid]
            lines.append(f"{uid},{x},{y},{z},{dmm},{label},{score}")
    (root / "malignancy.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def luna_root(tmp_path_factory):
    root = make_luna_folder(tmp_path_factory.mktemp("luna"), with_bad=False)
    _write_malignancy(root, {"1.1": (1, 4.5), "1.2": (0, 2.0)})
    return root


@pytest.fixture(scope="module")
def prepared(luna_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "st"
    prepare_dataset(luna_root, out, spacing_zyx=None, margin_mm=5.0, progress=False)
    return PatchStore.open(out), luna_root


def test_store_records_mask_source_consensus_sphere_and_malignancy(prepared):
    st, root = prepared
    assert st.manifest["version"] == STORE_VERSION == 2
    assert st.manifest["nodule_mask"] == "consensus"
    # 1.1 has nodule-masks/1.1.mhd: stored exactly (native grid, a 3 x 5 x 5 box).
    rec = st.scan("1.1")
    assert rec.nodule_mask_source == "consensus" and "nodules" in rec.arrays
    mask = st.read_volume("1.1", "nodules")
    assert (mask > 0).sum() == 3 * 5 * 5
    src = read_scan(str(root / "nodule-masks" / "1.1.mhd")).array
    s0 = rec.crop_start_zyx
    np.testing.assert_array_equal(
        mask, src[s0[0]:s0[0] + mask.shape[0], s0[1]:s0[1] + mask.shape[1],
                  s0[2]:s0[2] + mask.shape[2]])
    np.testing.assert_array_equal(rec.nodule_malignancy, [4.5])
    np.testing.assert_array_equal(rec.nodule_mask_label, [1])
    # 1.2 and 1.3 have no mask: balls of the annotated 8 mm at the annotated centre.
    for uid in ("1.2", "1.3"):
        rec = st.scan(uid)
        assert rec.nodule_mask_source == "sphere"
        mask = st.read_volume(uid, "nodules")
        c = np.rint(rec.nodules_zyx[0]).astype(int)
        assert mask[c[0], c[1], c[2]] == rec.nodule_mask_label[0] == 1
        assert (mask > 0).sum() * np.prod(rec.spacing_zyx) == pytest.approx(
            4 / 3 * np.pi * 4.0 ** 3, rel=0.25)
    assert st.scan("1.2").nodule_malignancy.tolist() == [2.0]
    # LUNA16-style data without a score: missing (NaN; null in the manifest), not made up.
    assert np.isnan(st.scan("1.3").nodule_malignancy).all()
    raw = read_manifest(st.path)
    assert raw["scans"]["1.3"]["nodule_malignancy"] == [None]


def test_sphere_mode_and_old_version_reprepare(luna_root, tmp_path):
    out = tmp_path / "st"
    write_manifest(str(out), {"format": STORE_FORMAT, "version": 1, "scans": {}})
    with pytest.raises(StoreError, match="version 1"):
        read_manifest(str(out))
    report = prepare_dataset(luna_root, out, spacing_zyx=None, margin_mm=5.0, progress=False,
                             subsets=[0], nodule_mask="sphere")
    assert any("prepared again" in w for w in report.warnings)
    rec = PatchStore.open(out).scan("1.1")
    assert rec.nodule_mask_source == "sphere" and rec.nodule_malignancy.tolist() == [4.5]


def test_bad_malignancy_names_the_scan(luna_root, tmp_path):
    root = tmp_path / "luna"
    make_luna_folder(root, with_bad=False)
    _write_malignancy(root, {"1.2": (0, 7.0)})
    with pytest.raises(StoreError, match=r"scan 1\.2: malignancy \[7\.0.*\] outside 1-5"):
        prepare_dataset(root, tmp_path / "st", spacing_zyx=None, progress=False, subsets=[1])


def test_mask_off_its_scan_grid_names_the_scan(tmp_path):
    root = tmp_path / "luna"
    make_luna_folder(root, with_bad=False)
    path = str(root / "nodule-masks" / "1.1.mhd")
    m = read_scan(path)
    moved = Geometry(m.geometry.spacing, m.geometry.origin + 2.0, m.geometry.direction)
    write_scan(path, m.array, moved)
    with pytest.raises(StoreError, match=r"scan 1\.1: nodule mask .* origin") as e:
        prepare_dataset(root, tmp_path / "st", spacing_zyx=None, progress=False, subsets=[0])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------
# A small store with nodule masks and malignancy.
# ---------------------------------------------------------------------------------

NODULES = {  # uid -> (centres zyx, diameters mm, malignancy)
    "a": ([[10, 12.4, 14], [6, 24, 22]], [6.0, 4.0], [4.5, 2.0]),
    "b": ([[9, 18, 18], [14, 8, 28]], [8.0, 5.0], [3.0, 1.0]),
    "c": ([[12, 20, 10]], [6.0], [5.0]),
    "d": ([], [], []),
}


def make_dense_store(path, mask_from_image=False) -> PatchStore:
    geom = Geometry.identity(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    scans = {}
    for fold, (uid, (c, d, m)) in enumerate(NODULES.items()):
        c = np.asarray(c, float).reshape(-1, 3)
        labels = sphere_labels(SHAPE, (1, 1, 1), c, d)
        image = rng.integers(0, 200, SHAPE, dtype=np.uint8)
        image[labels > 0] = 240
        if mask_from_image:
            labels = (image > 128).astype(np.uint8)
        lung = np.zeros(SHAPE, np.uint8)
        lung[2:18, 4:32, 4:32] = 1
        write_scan_arrays(path, uid, {"image": image, "lung": lung, "nodules": labels}, chunk=16)
        empty = np.zeros((0, 3))
        rec = ScanRecord(
            uid=uid, fold=fold, shape_zyx=SHAPE, geometry=geom,
            arrays=("image", "lung", "nodules"), nodules_zyx=c,
            nodules_world=voxel_to_world(c, geom), nodule_diameter_mm=np.asarray(d, float),
            dropped_world=empty, dropped_diameter_mm=np.zeros(0), excluded_zyx=empty,
            excluded_world=empty, excluded_diameter_mm=np.zeros(0), candidates_zyx=empty,
            candidates_world=empty, candidates_label=np.zeros(0, np.int64), transforms={},
            nodule_malignancy=np.asarray(m, float),
            nodule_mask_label=np.arange(1, len(d) + 1), nodule_mask_source="sphere")
        scans[uid] = rec.to_json()
    write_manifest(path, {"format": STORE_FORMAT, "version": STORE_VERSION,
                          "hu_window": [-1200, 600], "spacing_zyx": [1, 1, 1], "scans": scans})
    return PatchStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_dense_store(str(tmp_path_factory.mktemp("dense")))


def config(patch=(6, 10, 10), batch=4, name="balanced", **sampler):
    return run_config(
        train=dict(batch_size=batch),
        data=dict(patch_size_zyx=patch, positive_fraction=0.5, workers=0, read_threads=1,
                  prefetch_batches=2, eval_patches=0, batch_mask=True, batch_malignancy=True,
                  batch_mask_array="nodules", malignancy_uncertain="exclude"),
        augment=dict(
            positive=dict(flip_axes=(0, 1, 2), rot90=True, translate_nodule_fraction=1.0),
            negative=dict(flip_axes=(0, 1, 2), rot90=True, translate_mm=3.0)),
        sampler={**dict(name=name, steps_per_round=0, random_negatives_per_scan=4,
                        samples_per_round=16, slice_context=2, roi_balance=True,
                        roi_class_repeat=(1, 1)), **sampler})


def batches(ds_):
    return list(iter(ds_))


def test_malignancy_from_record_to_sampler_to_batch(store):
    rec = store.scan("a")
    np.testing.assert_array_equal(rec.nodule_malignancy, [4.5, 2.0])
    cfg = config()
    s = smp.Sampler.from_store(store, cfg)
    nod = s.pool[s.pool["kind"] == smp.NODULE]
    assert sorted(nod["malignancy"].tolist()) == [1.0, 2.0, 3.0, 4.5, 5.0]
    assert np.all(s.pool["malignancy"][s.pool["kind"] != smp.NODULE] == 0)
    index = s.freeze_index(seed=0)
    got = batches(pl.build_train_dataset(cfg, store, index, seed=0,
                                         targets=pl.Targets(malignancy=True)))
    for g, b in enumerate(got):
        rows = index.samples[4 * g:4 * g + 4]
        np.testing.assert_array_equal(b["malignancy"], rows["malignancy"])
        assert b["malignancy"].dtype == np.float32 and b["malignant"].dtype == np.int32
        np.testing.assert_array_equal(b["malignant"],
                                      smp.malignant_label(rows["malignancy"], "exclude"))
    assert smp.malignant_label([1, 2, 2.5, 3, 3.5, 4, 5, 0, np.nan]).tolist() == \
        [0, 0, -1, -1, -1, 1, 1, -1, -1]
    assert smp.malignant_label([3, 2.5], "benign").tolist() == [0, 0]


def test_targets_do_not_change_existing_batches(store):
    """Masks and labels are read without a single extra random draw: the image, offsets
    and every other key are bit-identical with and without them."""
    cfg = config()
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=5)
    plain = batches(pl.build_train_dataset(cfg, store, index, seed=5))
    rich = batches(pl.build_train_dataset(cfg, store, index, seed=5,
                                          targets=pl.Targets(mask=True, malignancy=True)))
    for a, b in zip(plain, rich):
        assert set(b) - set(a) == {"mask", "malignancy", "malignant"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("patch", [(6, 10, 10), (12, 12)])
def test_mask_follows_the_image_through_augmentation(tmp_path, patch):
    st = make_dense_store(str(tmp_path / "st"), mask_from_image=True)
    cfg = config(patch=patch)
    cfg.augment.positive.translate_nodule_fraction = 0.0
    cfg.augment.positive.translate_mm = 3.0
    index = smp.Sampler.from_store(st, cfg).freeze_index(seed=1)
    got = batches(pl.build_train_dataset(cfg, st, index, seed=1, targets=pl.Targets(mask=True)))
    flips = 0
    for b in got:
        img = b["image"][..., 0]
        assert b["mask"].shape == img.shape and b["mask"].dtype == np.uint8
        # The store's mask is (image > 128); inside the volume it must stay exactly that.
        inside = img > 0  # image values are >= 1/255 inside the scan, 0 outside
        np.testing.assert_array_equal(b["mask"][inside], (np.rint(img * 255) > 128)[inside])
        flips += int(b["mask"].any())
    assert flips


def test_mask_under_zoom_is_nearest_neighbour(store):
    cfg = config()
    cfg.augment.positive.scale_range = (0.8, 1.25)
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=2)
    for b in batches(pl.build_train_dataset(cfg, store, index, seed=2,
                                            targets=pl.Targets(mask=True))):
        assert set(np.unique(b["mask"])) <= {0, 1}
        pos = b["label"] == 1
        # Positive patches are centred (within the nodule radius) on a nodule mask.
        assert b["mask"][pos].reshape(pos.sum(), -1).any(axis=1).all()


def test_2d_patches_list_nodules():
    cfg = run_config(data={"patch_size_zyx": (32, 32), "max_nodules_per_patch": 2},
                     train={"batch_size": 2})
    assert pl.PipelineConfig.from_config(cfg).max_nodules == 2


# ---------------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------------

def test_balanced_slices_ratio_context_and_determinism(store):
    cfg = config(patch=(36, 36), batch=4, name="balanced_slices", samples_per_round=40)
    s = ds.slice_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 4, context=2)
    masks = {u: store.read_volume(u, "nodules") for u in store.uids()}
    for row in s.pool:
        uid = s.uids[row["scan"]]
        z = int(row["center_zyx"][0])
        assert row["label"] == int(masks[uid][z].any())
        # Only slices within 2 of a nodule's slices.
        zs = np.flatnonzero(masks[uid].reshape(SHAPE[0], -1).any(1))
        assert np.min(np.abs(zs - z)) <= 2
    assert "d" not in {s.uids[i] for i in s.pool["scan"]}  # no nodule: no slice
    a = s.freeze_index(seed=3)
    for g in range(a.num_batches):
        assert a.samples["label"][4 * g:4 * g + 4].sum() == 2
    again = ds.slice_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 4, 2)
    np.testing.assert_array_equal(again.freeze_index(seed=3).samples, a.samples)
    assert not np.array_equal(again.freeze_index(seed=3, round=1).samples, a.samples)
    state = s.state_dict()
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.current_index.samples, a.samples)
    every = ds.slice_sampler(store, ["d"], smp.SamplerConfig.from_config(cfg), 4, context=-1)
    assert len(every.pool) == 16 and not every.pool["label"].any()  # the lung's slices


def test_slice_train_data_batches_carry_masks(store):
    cfg = config(patch=(36, 36), batch=4, name="balanced_slices", samples_per_round=8)
    data = ds.SliceTrainData(cfg, store, ["a", "b"], ["c"])
    b = next(data.iterator(0))
    assert b["image"].shape == (4, 36, 36, 1) and b["mask"].shape == (4, 36, 36)
    np.testing.assert_array_equal(b["mask"].reshape(4, -1).any(1), b["label"] == 1)
    assert data.eval_index is not None and len(data.eval_index) > 0


def test_nodule_centred_slice_crops_hold_their_nodule(store):
    cfg = config(patch=(12, 12), batch=4, name="balanced_slices", samples_per_round=8,
                 slice_centre="nodule")
    cfg.augment.positive.translate_nodule_fraction = 0.0
    s = ds.slice_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 4, 2,
                         centre="nodule")
    middle = ds.slice_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 4, 2)
    np.testing.assert_array_equal(s.pool["label"], middle.pool["label"])
    for row in s.pool:
        uid = s.uids[row["scan"]]
        z, y, x = (int(v) for v in row["center_zyx"])
        if row["label"]:  # on the slice's nodule voxels
            assert store.read_volume(uid, "nodules")[z, y, x] > 0
        elif "lung" in store.scan(uid).arrays:  # on a lung voxel of the slice, if any
            lung = store.read_volume(uid, "lung")[z]
            assert lung[y, x] > 0 or not lung.any()
    # Not all at the middle, and the same pool every time (a function of the scans).
    assert np.any(s.pool["center_zyx"][:, 1:] != middle.pool["center_zyx"][:, 1:])
    again = ds.slice_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 4, 2,
                             centre="nodule")
    np.testing.assert_array_equal(again.pool, s.pool)
    # 12 x 12 crops of 36 x 36 slices: every positive crop still shows nodule voxels.
    data = ds.SliceTrainData(cfg, store, ["a", "b"], None)
    b = next(data.iterator(0))
    assert b["image"].shape == (4, 12, 12, 1)
    np.testing.assert_array_equal(b["mask"].reshape(4, -1).any(1), b["label"] == 1)
    with pytest.raises(ValueError, match="slice_centre"):
        ds.slice_rows(np.zeros((2, 4, 4), np.uint8), None, 0, 1, {}, centre="nodules")


def test_nodule_roi_centring_labels_and_balance(store):
    cfg = config(patch=(4, 8, 8), batch=2, name="nodule_roi", samples_per_round=0)
    s = ds.roi_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 2)
    # Malignancy 3 excluded; 4.5 and 5 malignant; 2 and 1 benign.
    assert sorted(zip(s.pool["malignancy"].tolist(), s.pool["label"].tolist())) == [
        (1.0, 0), (2.0, 0), (4.5, 1), (5.0, 1)]
    for row in s.pool:
        rec = store.scan(s.uids[row["scan"]])
        assert np.min(np.abs(rec.nodules_zyx - row["center_zyx"]).max(1)) < 1e-5
    idx = s.freeze_index(seed=0)
    assert len(idx) == 4 and all(idx.samples["label"][i:i + 2].sum() == 1 for i in (0, 2))
    both = ds.roi_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 2,
                          uncertain="benign", balance=False)
    assert len(both.pool) == 5 and len(both.freeze_index(seed=0)) == 6
    data = ds.RoiTrainData(cfg, store, store.uids())
    b = next(iter(pl.build_eval_dataset(cfg, store, data.sampler.freeze_eval_index(
        kinds=(smp.NODULE,)), targets=data.targets)))
    # Unaugmented ROIs: the nodule centre sits at the patch centre (rounding only).
    assert np.abs(b["offset_zyx"]).max() <= 1.0
    np.testing.assert_array_equal(b["malignant"], b["label"])
    assert b["mask"][:, 2, 4, 4].all()  # centre voxel inside the nodule mask


def test_tiny_generated_data_carry_consensus_masks_and_malignancy(tmp_path):
    """The generated preset: every scan's mask is its LIDC consensus mask, every nodule
    its real median malignancy, and ROI batches carry both."""
    from lungjax.data import synthetic

    root = synthetic.generate_dataset(str(tmp_path / "tiny"), "tiny", seed=0)
    prepare_dataset(root, tmp_path / "st", progress=False)
    st = PatchStore.open(tmp_path / "st")
    table = synthetic.read_malignancy_csv(f"{root}/malignancy.csv")
    for uid in st.uids():
        rec = st.scan(uid)
        assert rec.nodule_mask_source == "consensus"
        want = table["malignancy"][table["seriesuid"] == uid]
        np.testing.assert_array_equal(rec.nodule_malignancy, want)
        mask = st.read_volume(uid, "nodules")
        for c, k in zip(np.rint(rec.nodules_zyx).astype(int), rec.nodule_mask_label):
            assert k > 0 and (mask == k).any()
    cfg = config(patch=(16, 48, 48), batch=2, name="nodule_roi")
    data = ds.RoiTrainData(cfg, st, st.uids())
    b = next(data.iterator(0))
    assert b["image"].shape == (2, 16, 48, 48, 1) and b["mask"].shape == (2, 16, 48, 48)
    assert set(b["malignant"].tolist()) <= {0, 1} and np.all(b["malignancy"] >= 1)
    assert b["mask"].reshape(2, -1).any(1).all()
