"""bench/peer_monai.py without its peer: flags, settings, and the box <-> patch <-> world
bookkeeping (numpy only; torch and MONAI are not needed and not imported)."""

import importlib.util
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from lungjax.data.coords import Geometry, voxel_to_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "peer_monai.py"


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("bench_peer_monai", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_module_does_not_import_torch():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('m', "
            f"{str(SCRIPT)!r}); m = importlib.util.module_from_spec(s); "
            "sys.modules['m'] = m; s.loader.exec_module(m); "
            "print('torch' in sys.modules, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_flags(pm):
    args = pm.build_parser().parse_args(["--data", "D", "--minutes", "2.5", "--ours", "a.csv",
                                         "--ours", "b.csv", "--patch", "32,48,48"])
    assert args.data == "D" and args.minutes == 2.5 and args.ours == ["a.csv", "b.csv"]
    assert pm.parse_zyx(args.patch, "--patch") == (32, 48, 48)
    assert pm.parse_zyx("40", "--patch") == (40, 40, 40)
    for bad in ("32,32", "0,32,32", "a,b,c"):
        with pytest.raises(ValueError, match="--patch"):
            pm.parse_zyx(bad, "--patch")
    with pytest.raises(SystemExit):
        pm.build_parser().parse_args(["--minutes", "1"])  # --data is required


def test_check_args_names_the_flag(pm, tmp_path):
    p = pm.build_parser()
    with pytest.raises(ValueError, match="--minutes"):
        pm.check_args(p.parse_args(["--data", str(tmp_path), "--minutes", "0"]))
    with pytest.raises(FileNotFoundError, match="--ours"):
        pm.check_args(p.parse_args(["--data", str(tmp_path), "--minutes", "1",
                                    "--ours", str(tmp_path / "none.csv")]))


def test_settings_from_config(pm):
    config = pm.load_config("configs/dou2017.py:tiny")
    args = pm.build_parser().parse_args(["--data", "D", "--minutes", "1"])
    s = pm.peer_settings(args, config)
    assert pm.size_divisor(2) == 16
    assert s.patch_zyx == (32, 32, 32)  # (10, 30, 30) rounded up, at least 2 coarse cells
    assert s.val_roi_zyx == (96, 96, 96)  # 32 x 2.6 / 2.67, rounded up to 16
    args = pm.build_parser().parse_args(["--data", "D", "--minutes", "1", "--patch", "40,64,70"])
    assert pm.peer_settings(args, config).patch_zyx == (48, 64, 80)
    # The tutorial's first anchor, 6 x 8 x 4 voxels (x, y, z) at 0.703 x 0.703 x 1.25 mm.
    np.testing.assert_allclose(pm.anchor_shapes_zyx((1.0, 1.0, 1.0))[0], [5.0, 5.62, 4.22])
    np.testing.assert_allclose(pm.anchor_shapes_zyx((2.0, 0.5, 0.5))[0], [2.5, 11.25, 8.44])


def test_learning_rate_schedule(pm):
    assert pm.learning_rate(0.0) == pytest.approx(pm.LR / 10)
    assert pm.learning_rate(0.2) == pm.LR
    assert pm.learning_rate(0.5) == pytest.approx(pm.LR / 10)


def test_boxes_round_trip_to_world(pm):
    g = Geometry(np.array([0.7, 0.8, 1.25]), np.array([-150.0, 20.0, -300.0]),
                 np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    centres = np.array([[10.0, 20.5, 30.0], [0.0, 0.0, 0.0], [55.25, 3.0, 7.75]])
    diam = np.array([4.0, 12.5, 30.0])
    boxes = pm.nodule_boxes(centres, diam, g.spacing_zyx)
    # Voxel i spans [i, i + 1): the box of a nodule centred on voxel 0 is centred on 0.5.
    np.testing.assert_allclose((boxes[1, :3] + boxes[1, 3:]) / 2, 0.5)
    np.testing.assert_allclose(boxes[:, 3:] - boxes[:, :3], diam[:, None] / g.spacing_zyx,
                               rtol=1e-6)
    marks, d = pm.boxes_to_marks("u", boxes, np.array([0.9, 0.5, 0.1]), g)
    np.testing.assert_allclose(marks.xyz, voxel_to_world(centres, g), atol=1e-4)
    np.testing.assert_allclose(d, diam, rtol=1e-6)
    assert marks.uid.tolist() == ["u"] * 3
    np.testing.assert_allclose(marks.probability, [0.9, 0.5, 0.1])


def _box_of_mask(mask):
    idx = np.argwhere(mask)
    return np.r_[idx.min(0), idx.max(0) + 1].astype(np.float32)


def test_flip_and_rotation_move_boxes_with_the_image(pm):
    image = np.zeros((6, 8, 8), np.float32)
    image[1:3, 2:7, 5:8] = 1.0
    boxes = np.array([[1, 2, 5, 3, 7, 8]], np.float32)
    for axis in range(3):
        im, b = pm.flip(image, boxes, axis)
        np.testing.assert_array_equal(b[0], _box_of_mask(im > 0))
    for k in range(4):
        im, b = pm.rot90_yx(image, boxes, k)
        np.testing.assert_array_equal(im, np.rot90(image, k, axes=(1, 2)))
        np.testing.assert_array_equal(b[0], _box_of_mask(im > 0))


def test_crop_boxes_clips_and_drops(pm):
    boxes = np.array([[2, 2, 2, 6, 6, 6], [30, 30, 30, 34, 34, 34], [-5, 0, 0, 1, 4, 4]],
                     np.float32)
    out = pm.crop_boxes(boxes, np.array([1, 0, 0]), (8, 8, 8))
    np.testing.assert_array_equal(out, [[1, 2, 2, 5, 6, 6]])  # the third is clipped away


class _FakeStore:
    """A one-scan store: a bright cube per nodule, read like ``PatchStore.read_patch``."""

    def __init__(self):
        self.volume = np.zeros((60, 70, 80), np.float32)
        centres = np.array([[20, 30, 40], [45, 12, 66]])
        radii = np.array([2, 4])
        for c, r in zip(centres, radii):
            self.volume[tuple(slice(v - r, v + r + 1) for v in c)] = 1.0
        # Diameter 2r + 1 voxels: the box is exactly the cube.
        self.rec = types.SimpleNamespace(nodules_zyx=centres.astype(float),
                                         nodule_diameter_mm=2.0 * radii + 1,
                                         spacing_zyx=np.ones(3), shape_zyx=self.volume.shape)

    def scan(self, uid):
        return self.rec

    def read_patch(self, uid, center_zyx, size_zyx):
        start = np.asarray(center_zyx) - np.asarray(size_zyx) // 2
        out = np.zeros(size_zyx, np.float32)
        lo, hi = np.maximum(start, 0), np.minimum(start + size_zyx, self.volume.shape)
        a, b = lo - start, hi - start
        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = self.volume[lo[0]:hi[0], lo[1]:hi[1],
                                                           lo[2]:hi[2]]
        return out


def test_sampled_boxes_cover_the_nodules_in_the_patch(pm):
    sampler = pm.PatchSampler(_FakeStore(), ["u"], (32, 32, 32), seed=3, intensity=False)
    seen_positive = 0
    for _ in range(6):
        images, boxes = sampler.batch(4)
        assert images.shape == (4, 1, 32, 32, 32) and images.dtype == np.float32
        for j, (im, b) in enumerate(zip(images[:, 0], boxes)):
            fg = im > 0.5
            if j < 2:  # nodule patches hold their whole nodule
                assert len(b) >= 1
                seen_positive += 1
            if len(b):
                mask = np.zeros_like(fg)
                for z0, y0, x0, z1, y1, x1 in b.astype(int):
                    mask[z0:z1, y0:y1, x0:x1] = True
                np.testing.assert_array_equal(fg, mask)
            else:
                assert not fg.any()
    assert seen_positive == 12
