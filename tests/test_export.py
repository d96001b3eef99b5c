"""Export: params + serialized predict fn (symbolic batch) + sidecar; a fresh process
reloads it and reproduces the in-process predictions."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.export import export_predictor, load_predictor
from lungjax.models.fcn import Dou2017FCN
from lungjax.steps import make_predict_fn
from lungjax.tasks.classification import ClassificationTask

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_export_round_trip_in_fresh_process(tmp_path):
    model = Dou2017FCN(features=(4, 4, 8, 8), init_std=0.1, conv_impl="xla")
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), jnp.zeros((1, 10, 30, 30, 1)))
    predict = make_predict_fn(model, ClassificationTask())
    out = tmp_path / "export"
    sidecar = export_predictor(str(out), predict, variables, (10, 30, 30),
                               {"preprocessing": {"spacing_zyx": [1, 1, 1],
                                                  "hu_window": [-1200, 600]}})
    assert sidecar["input"]["shape"] == ["b", 10, 30, 30, 1]
    assert sorted(os.listdir(out)) == ["export.json", "params.msgpack", "predict.jax"]

    x = np.random.default_rng(0).random((3, 10, 30, 30, 1), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(jax.jit(predict)(variables, x))
    assert expected.shape == (3, 1, 1, 1)

    script = ("import sys, numpy as np; from lungjax.export import load_predictor; "
              "p, meta = load_predictor(sys.argv[1]); x = np.load(sys.argv[2]); "
              "np.save(sys.argv[3], p(x)); np.save(sys.argv[4], p(x[:1, ..., 0]))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # a different device count must not matter
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy"), str(tmp_path / "y1.npy")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.load(tmp_path / "y1.npy"), expected[:1], rtol=1e-6, atol=1e-7)

    meta = json.loads((out / "export.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"]["hu_window"] == [-1200, 600]
    assert meta["versions"]["jax"] == jax.__version__


def test_load_predictor_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="predict.jax"):
        (tmp_path / "params.msgpack").write_bytes(b"")
        load_predictor(str(tmp_path))


def test_export_with_symbolic_spatial_sizes_runs_on_any_volume(tmp_path):
    model = Dou2017FCN(features=(4, 4, 8, 8), init_std=0.1, conv_impl="xla")
    variables = jax.jit(model.init)(jax.random.key(2, impl="rbg"), jnp.zeros((1, 10, 30, 30, 1)))
    predict = make_predict_fn(model, ClassificationTask())
    sidecar = export_predictor(str(tmp_path), predict, variables, (None, None, None), {},
                               min_size_zyx=(10, 30, 30))
    assert sidecar["input"]["shape"] == ["b", "d", "h", "w", 1]
    loaded, _ = load_predictor(str(tmp_path))
    x = np.random.default_rng(1).random((1, 13, 34, 41, 1), dtype=np.float32)
    y = loaded(x)
    assert y.shape == (1, 4, 3, 6)  # (13 - 9, (34 - 4) // 2 - 12, (41 - 4) // 2 - 12)
    np.testing.assert_allclose(y, np.asarray(jax.jit(predict)(variables, x)), rtol=1e-6,
                               atol=1e-7)


def test_a_whole_scan_export_runs_rebuilt_with_each_shapes_own_plans(tmp_path):
    from lungjax.export import rebuild_spec
    from lungjax.models.conv import select as conv_select

    model = Dou2017FCN(features=(4, 4, 8, 8), init_std=0.1, conv_impl="xla")
    variables = jax.jit(model.init)(jax.random.key(3, impl="rbg"), jnp.zeros((1, 10, 30, 30, 1)))
    task = ClassificationTask()
    predict = make_predict_fn(model, task, output="log_odds")
    meta = {"model": {"name": "dou2017_fcn", "features": [4, 4, 8, 8], "init_std": 0.1,
                      "conv_impl": "auto"},
            "task": {"name": "classification", "num_classes": 2},
            "rebuild": rebuild_spec("log_odds", "auto")}
    export_predictor(str(tmp_path), predict, variables, (None, None, None), meta,
                     min_size_zyx=(10, 30, 30))
    x = np.random.default_rng(4).random((1, 13, 34, 41, 1), dtype=np.float32)
    serialized, _ = load_predictor(str(tmp_path), rebuild=False)
    rebuilt, _ = load_predictor(str(tmp_path))
    # The serialized function was traced once, with symbolic sizes: nothing is traced now.
    with conv_select.record_keys() as keys:
        y0 = serialized(x)
    assert keys == []
    # Rebuilt, each concrete shape is traced, its layers looked up as forward passes.
    with conv_select.record_keys() as keys:
        y1 = rebuilt(x)
    assert [k.spatial for k in keys][:2] == [(13, 34, 41), (11, 15, 18)]
    assert {k.mode for k in keys} == {"forward"}
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)
    # A model this installation lacks, or no rebuild section: the serialized function.
    side = json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))
    for change in ({"model": {**meta["model"], "name": "not_a_model"}}, {"rebuild": None}):
        (tmp_path / "export.json").write_text(json.dumps({**side, **change}), encoding="utf-8")
        again, _ = load_predictor(str(tmp_path))
        with conv_select.record_keys() as keys:
            np.testing.assert_array_equal(again(x), y0)
        assert keys == []
    with pytest.raises(ValueError, match="rebuild output 'logits'"):
        rebuild_spec("logits")
