"""Convolution plans measured on the machine that runs: first-use tuning, the per-machine
cache (fingerprint, corrupt and foreign files), forward-only plans, ``lungjax.tune``."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lungjax.models.conv import machine as conv_machine
from lungjax.models.conv import malloc as conv_malloc
from lungjax.models.conv import select as conv_select
from lungjax.models.conv import split as conv_split
from lungjax.models.conv import tune as conv_tune
from lungjax.models.layers import Conv

from conftest import ROOT, load_config

KEY = conv_select.ConvKey("conv", 2, (6, 6), 3, 4, (3, 3), (1, 1), (1, 1), ((1, 1),) * 2,
                          "float32")


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """First-use tuning on, into an empty cache folder, with a fresh process state."""
    monkeypatch.setenv(conv_select.ENV_TUNE, "1")
    monkeypatch.setenv(conv_machine.ENV_CACHE_DIR, str(tmp_path / "conv"))
    for env in (conv_select.ENV_TUNE_SECONDS, conv_select.ENV_TUNE_TOTAL, conv_select.ENV_IMPL):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(conv_select, "_state", conv_select._State())
    monkeypatch.setattr(conv_select._state, "warned", set())
    return tmp_path / "conv"


def _entries(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["fingerprint"] == conv_machine.fingerprint()
    return {conv_select.ConvKey.from_json(e["key"]): e for e in data["entries"]}


def test_fingerprint_names_the_machine_and_the_cache_file(tuning):
    fp = conv_machine.fingerprint()
    assert {"cpu", "isa", "cores", "caches", "jax", "jaxlib", "malloc"} <= set(fp)
    assert fp["cores"] >= 1 and fp["jax"] == jax.__version__
    assert conv_machine.cache_file() == tuning / f"{conv_machine.fingerprint_id()}.json"
    other = dict(fp, malloc="keep" if fp["malloc"] == "default" else "default")
    assert conv_machine.fingerprint_id(other) != conv_machine.fingerprint_id()


def test_first_use_tuning_measures_caches_and_is_reused(tuning, capsys, monkeypatch):
    x = jnp.ones((2, 6, 6, 3))
    m = Conv(4, (3, 3))
    params = m.init(jax.random.key(0), x)  # traces the layer: training pass
    with conv_select.forward_only():
        y = jax.jit(m.apply)(params, x)  # traced inside a jit: forward-only pass
    assert y.shape == (2, 6, 6, 4)
    err = capsys.readouterr().err
    assert err.count("tuning convolution plans for this machine") == 1, err
    entries = _entries(conv_machine.cache_file())
    train, fwd = KEY, dataclasses.replace(KEY, mode="forward")
    assert set(entries) == {train, fwd}
    # Each a winner among at least two timed formulations, the forward one among forward
    # plans only (XLA's, or a split plan with native gradients).
    assert len(entries[train]["ms"]) >= 2 and entries[train]["best"] in entries[train]["ms"]
    assert len(entries[fwd]["ms"]) >= 2
    assert all(i == "xla" or (conv_split.is_split(i) and i.endswith("xx"))
               for i in entries[fwd]["ms"])
    assert conv_select.lookup(train) == (entries[train]["best"], "tuned")
    # A later process reads the cache: no measurement, the same plan.
    monkeypatch.setattr(conv_select, "_state", conv_select._State())

    def no_timing(*a, **k):
        raise AssertionError("measured a shape the cache holds")

    monkeypatch.setattr(conv_tune, "tune_bounded", no_timing)
    assert conv_select.resolve("auto", train) == entries[train]["best"]
    with conv_select.forward_only():
        assert conv_select.resolve("auto", KEY) == entries[fwd]["best"]
        # A forward shape with twice the rows takes the measured plan of its neighbour.
        bigger = dataclasses.replace(KEY, batch=4)
        assert conv_select.lookup(dataclasses.replace(bigger, mode="forward")) == \
            (entries[fwd]["best"], "tuned")


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tuning):
    path = conv_machine.cache_file()
    path.parent.mkdir(parents=True)
    shipped = conv_select.lookup(KEY)
    assert shipped[1] in ("exact", "nearest")
    path.write_text("{not json", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert conv_select.lookup(KEY) == shipped
    conv_select._state.cache = None
    foreign = dict(conv_machine.fingerprint(), cpu="Some Other CPU")
    path.write_text(json.dumps({"fingerprint": foreign, "entries": [
        {"key": KEY.to_json(), "best": "im2col", "ms": {"im2col": 1.0, "xla": 9.0}}]}),
        encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="another machine: Some Other CPU"):
        assert conv_select.lookup(KEY) == shipped  # its "im2col" is not trusted
    # The next measurement rewrites the file under this machine's fingerprint.
    conv_select.record(KEY, {"xla": 2.0, "matmul": 1.0})
    assert _entries(path)[KEY]["best"] == "matmul"
    assert conv_select.lookup(KEY) == ("matmul", "tuned")


def test_tuning_off_or_out_of_time_keeps_the_shipped_plans(tuning, capsys, monkeypatch):
    shipped = conv_select.lookup(KEY)[0]
    monkeypatch.setenv(conv_select.ENV_TUNE, "0")
    assert conv_select.resolve("auto", KEY) == shipped
    monkeypatch.setenv(conv_select.ENV_TUNE, "1")
    monkeypatch.setenv(conv_select.ENV_TUNE_TOTAL, "0")
    assert conv_select.resolve("auto", KEY) == shipped
    assert not tuning.exists()
    assert "tuning time (0 s, LUNGJAX_CONV_TUNE_TOTAL_SECONDS) is spent" in capsys.readouterr().err
    monkeypatch.setenv(conv_select.ENV_TUNE_SECONDS, "soon")
    with pytest.raises(ValueError, match=conv_select.ENV_TUNE_SECONDS):
        conv_select.tune_seconds()


def test_the_shipped_plan_is_measured_and_kept_unless_twice_as_slow(tuning, monkeypatch):
    """A run tuning layer by layer must not hand one layer's winner on as the next one's
    only plan to beat: the shipped table's plan is always a candidate, and it stays unless
    another takes at most half its time."""
    key = conv_select.ConvKey("conv", 6, (16, 32, 32), 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1),
                              ((1, 1),) * 3, "float32")
    shipped = conv_select.lookup(key, measured=False)[0]
    names = conv_tune.candidates(key, None, "matmul", None)
    assert shipped in names and shipped != "matmul"
    timed = []  # the candidate each compiled function stands for, in order

    def timed_fn(key, name):
        timed.append(name)
        return lambda x, w, g: x.sum()  # compiles in no time; the timing is mocked

    monkeypatch.setattr(conv_tune, "_timed_fn", timed_fn)
    monkeypatch.setattr(conv_tune, "_estimate_ms", lambda *a: 0.0)
    for faster, want in ((0.6, shipped), (0.4, "matmul")):
        times = {shipped: 10.0, "matmul": 10.0 * faster, "xla": 50.0}
        monkeypatch.setattr(conv_tune, "_median_ms",
                            lambda *a, t=times: t.get(timed[-1], 99.0))
        out = conv_tune.tune_bounded(key, None, "matmul", 60.0, None)
        assert shipped in out["ms"] and out["best"] == want, (faster, out)
    # Only the shipped plan fits the time left (the others' estimates overrun it): the
    # fallback stands, untimed (this raised a KeyError on the fallback's missing time).
    monkeypatch.setattr(conv_tune, "_estimate_ms",
                        lambda key, name, prior, ms: 0.0 if name == shipped else 1e9)
    timed.clear()
    out = conv_tune.tune_bounded(key, None, "matmul", 60.0, None)
    assert timed == [shipped] and out == {**out, "ms": {}, "best": "matmul"}


def test_a_shape_too_large_for_its_time_is_not_measured():
    # dou2017's conv2 on a whole 300^3 scan: ~1.2 TFLOP per pass, no time to measure it
    # in a second (and nothing is allocated to find that out).
    scan = conv_select.ConvKey("conv", 1, (296, 146, 146), 64, 64, (3, 5, 5), (1, 1, 1),
                               (1, 1, 1), ((0, 0),) * 3, "float32", mode="forward")
    out = conv_tune.tune_bounded(scan, None, "xla", 1.0, conv_select.buffer_budget())
    assert out["ms"] == {} and out["best"] == "xla" and out["seconds"] < 0.5
    # Its candidates stay within the buffer budget: no full im2col of the scan.
    names = conv_tune.candidates(scan, None, "split_3xx", conv_select.BUFFER_BUDGET_BYTES)
    assert "xla" in names and "split_3xx" not in names


def test_a_skipped_scan_shape_stands_for_similar_ones(tuning, monkeypatch):
    """A forward-only shape recorded as too large to measure ("skipped") keeps its plan for
    the next scan's similar shape (output rows within 2x) without another try; a measured
    similar shape is preferred; a shape 3x larger is tried."""
    scan = conv_select.ConvKey("conv", 1, (150, 110, 170), 1, 32, (3, 5, 5), (1, 1, 1),
                               (1, 1, 1), ((0, 0),) * 3, "float32", mode="forward")
    conv_select.record(scan, {}, "split_3xx")
    tries = []
    monkeypatch.setattr(conv_select, "_tune", lambda key, fallback: tries.append(key) or "x")
    similar = dataclasses.replace(scan, spatial=(160, 120, 180))
    assert conv_select.lookup(similar) == ("split_3xx", "skipped")
    assert conv_select.resolve("auto", similar) in ("split_3xx", "split_sxx")
    assert tries == []
    conv_select.record(dataclasses.replace(scan, spatial=(155, 115, 175)), {"matmul": 1.0})
    assert conv_select.lookup(similar) == ("matmul", "tuned")
    large = dataclasses.replace(scan, spatial=(300, 330, 170))
    conv_select.resolve("auto", large)
    assert tries == [large]


def test_tune_command_measures_every_shape_of_a_method(tuning):
    config = load_config(ROOT / "configs" / "dou2017.py", "tiny")
    from lungjax import tune

    keys = tune.method_keys(config)
    modes = {k.mode for k in keys}
    assert modes == {"train", "forward"} and len(keys) % 2 == 0
    # Both networks of the method (FCN screening: 1 input channel; FP reduction: also 1;
    # their widths differ) at their stages' batch sizes.
    assert len({(k.batch, k.spatial) for k in keys}) >= 4
    rows = tune.tune_keys(keys[:2], 20.0, progress=False)
    entries = _entries(conv_machine.cache_file())
    assert all(len(r["ms"]) >= 2 for r in rows)
    for row, key in zip(rows, keys[:2]):
        want = conv_tune.pick_best(row["ms"])  # the fastest, a split plan by a margin
        shipped = conv_select.lookup(key, measured=False)[0]
        if shipped in row["ms"] and row["ms"][want] > \
                conv_tune.SHIPPED_MARGIN * row["ms"][shipped]:
            want = shipped  # the shipped plan stays unless another takes half its time
        assert entries[key]["best"] == row["after"] == want
    # Listed from the command line (no measurement), one line naming the cache. The
    # allocator settings are part of the fingerprint: the command runs under this process's.
    keep = conv_malloc.is_kept()
    out = subprocess.run([sys.executable, "-m", "lungjax.tune",
                          f"--config={ROOT / 'configs' / 'dou2017.py'}:tiny", "--list",
                          f"--config.runtime.keep_freed_memory={keep}",
                          f"--config.runtime.huge_pages={conv_malloc.huge_pages_on()}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert f"{len(keys)} convolution shapes" in out.stdout
    assert out.stdout.count("(tuned)") >= 2, out.stdout
