"""Test set-up: eight simulated CPU devices, set before JAX initialises its backends,
so sharding tests see a multi-device mesh on any machine; the shipped convolution plans."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The shipped convolution plans, never a timing at trace time: tests (and the runs they
# start) stay deterministic and take the same time on every machine. The tuning's own
# tests switch it on into a temporary cache.
os.environ["LUNGJAX_CONV_TUNE"] = "0"

import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# Child processes print UTF-8 (progress bars): their output is read as UTF-8 whatever
# the test runner's locale.
UTF8 = dict(text=True, encoding="utf-8", errors="replace")

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data_cache(tmp_path_factory) -> str:
    """One ``data.cache_dir`` for every end-to-end test of the session: the generated
    ``tiny`` dataset is made once, and each store variant (spacing, nodule-mask rule) is
    prepared once beside it."""
    return str(tmp_path_factory.mktemp("tiny_data_cache"))


def run_until_killed(script: str, workdir) -> None:
    """Runs ``python -c script workdir`` (the repository importable) and checks that it
    died of SIGKILL, the way a preempted or OOM-killed run dies."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(workdir)], env=env,
                          capture_output=True, **UTF8, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def run_together(commands, timeout: float = 400) -> list[str]:
    """Starts every ``(argv, env)`` at once (e.g. the processes of one multi-host run),
    waits for all, checks each exited 0; returns their outputs (stdout + stderr)."""
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              **UTF8) for argv, env in commands]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.fixture(scope="session")
def luna16_tables_dir() -> pathlib.Path:
    """The real LUNA16 reference tables (``../shared/luna16``), or a skip."""
    d = pathlib.Path(os.environ.get("LUNGJAX_LUNA16_TABLES", SHARED / "luna16"))
    if not (d / "annotations.csv").is_file():
        pytest.skip(f"real LUNA16 tables not found at {d}")
    return d


def run_config(**sections):
    """The full run config of ``lungjax/config_schema.py`` (every declared field at its
    default) with ``sections`` (dicts, nested) merged in, as a method file would set them."""
    from lungjax.config_schema import get_config

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and k in dst and hasattr(dst[k], "to_dict"):
                merge(dst[k], v)
            else:
                dst[k] = v

    c = get_config()
    merge(c, sections)
    return c


def load_config(path, arg=None):
    """``get_config(arg)`` of the config file ``path`` (relative to the repository root)."""
    import importlib.util

    full = pathlib.Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(f"cfg_{full.stem}", full)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def assert_beats_step0(config, stage: str, evaluator: str, trained: dict, figure: str,
                       margin: float) -> None:
    """Asserts a trained stage's held-out ``figure`` (its record's ``eval/<evaluator>``,
    ``trained``) exceeds the same evaluator's on the stage's initial state by ``margin``:
    the network the trained run started from (same config and seed), on the same
    held-out data. A network that learns nothing keeps its step-0 figures."""
    from lungjax import stages, train
    from lungjax.train_data import build_train_data

    cfg = stages.stage_config(config, stage, dict(stages.stage_specs(config))[stage])
    engine = train.build_engine(cfg)
    hook = next(e for e in train.build_evaluators(cfg) if e.name == evaluator)
    step0 = hook(engine, engine.init_state(), build_train_data(cfg))
    print(f"{config.name} {stage} held-out {figure}: step 0 {step0[figure]:.4f}, trained "
          f"{trained[figure]:.4f} ({int(step0['count'])} samples)")
    assert step0["count"] == trained["count"] > 0
    assert trained[figure] > step0[figure] + margin


def scan_of(config, uid: str) -> str:
    """The path of scan ``uid`` in the dataset the config's store was prepared from."""
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.store import read_manifest
    from lungjax.train_data import prepare_data

    return Luna16Dataset.open(read_manifest(prepare_data(config))["source_root"]).scan_path(uid)


def read_on_scan_grid(path, scan_path):
    """The image at ``path``, checked to lie on the scan's own grid (size, spacing,
    origin); returns the SimpleITK image."""
    import numpy as np
    import SimpleITK as sitk

    image, scan = sitk.ReadImage(str(path)), sitk.ReadImage(str(scan_path))
    assert image.GetSize() == scan.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), scan.GetSpacing())
    np.testing.assert_allclose(image.GetOrigin(), scan.GetOrigin())
    return image
