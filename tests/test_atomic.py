"""Atomic writes (lungjax.atomic): the target appears whole or not at all."""

import json
import os
import stat

import numpy as np
import pytest

from lungjax import atomic


def _boom(*a, **k):
    raise OSError("disk full")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out.txt"
    atomic.atomic_write_text(p, "old")
    monkeypatch.setattr(atomic.os, "replace", _boom)
    with pytest.raises(OSError):
        atomic.atomic_write_text(p, "new")
    assert p.read_text(encoding="utf-8") == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_extension_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "fig.png"
    with atomic.atomic_path(target) as tmp:
        assert tmp.endswith("fig.png") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as f:
            f.write("x")
    assert target.read_text() == "x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by others, unlike mkstemp's
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError
    assert target.read_text() == "x"
    assert sorted(x.name for x in target.parent.iterdir()) == ["fig.png"]


def test_atomic_write_npz_and_json(tmp_path):
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    for compressed in (False, True):
        p = tmp_path / f"c{compressed}.npz"
        atomic.atomic_write_npz(p, compressed=compressed, a=a, s=np.array("uid"))
        with np.load(p) as z:
            np.testing.assert_array_equal(z["a"], a)
            assert z["a"].dtype == np.int16 and str(z["s"]) == "uid"
    atomic.atomic_write_json(tmp_path / "r.json", {"b": np.float32(0.5), "a": np.arange(2)})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [0, 1], "b": 0.5} and text.index('"a"') < text.index('"b"')
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cFalse.npz", "cTrue.npz", "r.json"]
