"""Run folders, exports and stores on object storage, against local stand-ins.

A Google Cloud Storage emulator (``gcp-storage-emulator``, in memory) and an S3-compatible
server (``moto``) run in this test process on free ports; lungjax reaches them through the
variables a user would set for a private endpoint (``STORAGE_EMULATOR_HOST`` and
``TENSORSTORE_GCS_HTTP_URL`` for GCS, ``AWS_ENDPOINT_URL`` for S3). The end-to-end test
runs the dou2017 ``tiny`` method with its run folder on ``gs://``: every stage's files,
Orbax checkpoints, the resume, the export and the predict command reading the export
from the bucket.
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, UTF8, load_config

pytest.importorskip("gcsfs")
pytest.importorskip("s3fs")


@contextlib.contextmanager
def _environment(env: dict):
    """``os.environ`` with ``env`` set, restored after (child processes inherit it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulate_generations(server_mod) -> None:
    """What the emulator leaves out and GCS does, and Orbax's checkpoints (tensorstore's
    OCDBT manifest: read, then replace only if unchanged) depend on: a download names its
    object's generation (``x-goog-generation``), and an upload with ``ifGenerationMatch``
    is refused (412) when the object's generation is another (0: when it exists)."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects, "_lungjax_generations", False):
        return
    download, insert = objects.download, objects.insert

    def generation(storage, bucket, name) -> str:
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return "0"

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
            response["x-goog-generation"] = generation(
                storage, request.params["bucket_name"], request.params["object_id"])
            response["x-goog-metageneration"] = "1"

    def insert_if_generation_matches(request, response, storage, *args, **kwargs):
        want, name = request.query.get("ifGenerationMatch"), request.query.get("name")
        if want and name and generation(storage, request.params["bucket_name"],
                                        name[0]) != want[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            return None
        return insert(request, response, storage, *args, **kwargs)

    # objects.get (alt=media) and the router call these two by module attribute too.
    objects.download, objects.insert = download_with_generation, insert_if_generation_matches
    for _, handlers in server_mod.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is download:
                handlers[method] = download_with_generation
            elif fn is insert:
                handlers[method] = insert_if_generation_matches
    objects._lungjax_generations = True


@pytest.fixture(scope="module")
def gcs():
    """An in-memory GCS emulator with bucket ``bkt``; the environment points at it."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    _emulate_generations(server_mod)
    port = _free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    # The emulator logs every request, and a traceback whenever a client hangs up early.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    url = f"http://127.0.0.1:{port}"
    try:
        with _environment({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}) as env:
            yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket ``bkt``; the environment points at it."""
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with _environment(env):
            import fsspec

            fsspec.filesystem("s3").mkdir("bkt")
            yield env
    finally:
        server.stop()


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_the_file_layer_reads_back_what_it_writes(scheme, request, tmp_path):
    """Every operation run folders use, on a bucket: atomic writes (bytes, JSON, through a
    temporary file, a MetaImage pair), listing, folders as prefixes, move aside, delete."""
    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    from lungjax import fileio
    from lungjax.atomic import atomic_path, atomic_write_bytes, atomic_write_json
    from lungjax.data.coords import Geometry
    from lungjax.data.io import read_scan, write_scan

    root = f"{scheme}://bkt/layer"
    assert fileio.is_url(root) and not fileio.is_url("file:///x") and not fileio.is_url("a/b")
    fileio.makedirs(root + "/stage")  # a prefix: nothing to make
    assert not fileio.isdir(root + "/stage")
    atomic_write_json(root + "/stage/record.json", {"step": np.int64(4), "cpm": 0.5})
    atomic_write_bytes(root + "/stage/raw.bin", b"\x00\x01")
    with atomic_path(root + "/stage/cands.npz") as tmp:
        np.savez(tmp, xyz=np.arange(6.0).reshape(2, 3))
    assert fileio.isdir(root + "/stage") and fileio.isfile(root + "/stage/record.json")
    assert sorted(fileio.listdir(root + "/stage")) == ["cands.npz", "raw.bin", "record.json"]
    with fileio.open_file(root + "/stage/record.json", encoding="utf-8") as f:
        assert json.load(f) == {"cpm": 0.5, "step": 4}
    with fileio.open_file(root + "/stage/cands.npz", "rb") as f, np.load(f) as z:
        np.testing.assert_array_equal(z["xyz"], np.arange(6.0).reshape(2, 3))
    with fileio.open_file(root + "/stage/notes.txt", "w") as f:
        f.write("written on close\n")
    assert fileio.open_file(root + "/stage/notes.txt").read() == "written on close\n"
    with pytest.raises(ValueError, match="cannot append"):
        fileio.open_file(root + "/stage/notes.txt", "a")
    with pytest.raises(FileNotFoundError, match="no such file"):
        fileio.open_file(root + "/stage/missing.json")

    # A mask as MetaImage: the .raw lands before the .mhd that names it.
    geo = Geometry(spacing=(0.7, 0.7, 2.0), origin=(-10.0, 5.0, 2.5), direction=np.eye(3))
    mask = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3 == 0).astype(np.uint8)
    write_scan(root + "/masks/m.mhd", mask, geo)
    assert sorted(fileio.listdir(root + "/masks")) == ["m.mhd", "m.raw"]
    for n in ("m.mhd", "m.raw"):
        with fileio.open_file(f"{root}/masks/{n}", "rb") as src:
            (tmp_path / n).write_bytes(src.read())
    back = read_scan(str(tmp_path / "m.mhd"))
    np.testing.assert_array_equal(back.array, mask)
    np.testing.assert_allclose(back.geometry.origin, geo.origin)

    fileio.move(root + "/stage", root + "/stage.old")
    assert not fileio.exists(root + "/stage") and fileio.isfile(root + "/stage.old/raw.bin")
    fileio.remove(root + "/stage.old")
    assert not fileio.exists(root + "/stage.old")
    with pytest.raises(ValueError, match="unsupported URL scheme 'az'"):
        fileio.isfile("az://bkt/x")


def test_the_metric_log_of_a_bucket_run_folder_is_uploaded_and_resumed(gcs):
    """Object stores cannot append: the log is kept locally and uploaded; a writer opened
    on an existing log (a resumed run) continues it."""
    from lungjax.metrics_log import METRICS_JSONL, MetricWriter, read_jsonl

    run = "gs://bkt/metrics_run"
    with MetricWriter(run) as w:
        w.write(1, {"loss": 0.9})
        w.write(2, {"loss": float("nan")})
    with MetricWriter(run) as w:
        w.write(3, {"loss": 0.5}, split="eval")
    rows = read_jsonl(f"{run}/{METRICS_JSONL}")
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "eval")]
    assert rows[1]["loss"] == "nan"
    from lungjax import fileio

    assert sorted(fileio.listdir(f"{run}/tb")) == ["eval", "train"]


@pytest.mark.slow
def test_an_s3_store_is_read_through_the_endpoint_and_an_s3_run_folder_is_refused(
        s3, tmp_path, tiny_data_cache):
    """A patch store prepared on S3 (tensorstore, given the endpoint and region from the
    AWS variables) holds the same volumes as the local one; checkpoints on S3 are refused
    in one line, since this Orbax builds checkpoint paths for local folders and gs:// only."""
    from lungjax.checkpointing import checkpoint_path
    from lungjax.data.prepare import prepare_dataset
    from lungjax.data.store import PatchStore, kvstore_spec, read_manifest
    from lungjax.train_data import prepare_data

    spec = kvstore_spec("s3://bkt/store")
    assert spec["endpoint"] == s3["AWS_ENDPOINT_URL"] and spec["aws_region"] == "us-east-1"
    config = load_config("configs/dou2017.py", "tiny")
    config.data.cache_dir = tiny_data_cache
    local = prepare_data(config)  # the tiny data, shared with the end-to-end test below
    manifest = read_manifest(local)
    prepare_dataset(manifest["source_root"], "s3://bkt/store",
                    spacing_zyx=tuple(config.data.spacing_zyx), subsets=[0], progress=False)
    remote, here = PatchStore.open("s3://bkt/store"), PatchStore.open(local)
    uid = remote.uids([0])[0]
    assert remote.uids([0]) == here.uids([0])
    np.testing.assert_array_equal(remote.read_volume(uid), here.read_volume(uid))

    with pytest.raises(ValueError, match=r"s3://bkt/run/checkpoints: orbax-checkpoint .* gs://"):
        checkpoint_path("s3://bkt/run/checkpoints")
    assert checkpoint_path("gs://bkt/run/checkpoints/") == "gs://bkt/run/checkpoints"
    assert checkpoint_path(tmp_path / "c") == str(tmp_path / "c")


E2E_CONFIG = textwrap.dedent("""
    import importlib.util
    _spec = importlib.util.spec_from_file_location("dou", {path!r})
    _m = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_m)

    def get_config(arg=None):
        c = _m.get_config("tiny,steps=4")
        c.data.cache_dir = {cache!r}
        return c
""")


@pytest.mark.slow
def test_a_method_runs_resumes_exports_and_predicts_with_its_run_folder_on_gcs(
        gcs, tmp_path, tiny_data_cache):
    """dou2017 ``tiny`` (4 steps a network: the plumbing, not the model, is under test)
    with ``--workdir=gs://...``: every stage's record, checkpoints, metric logs, candidates,
    the submission and plots land in the bucket and nothing in a local folder named after
    the URL; a second run finds every stage done; ``--mode=export`` writes the export to
    the bucket and ``lungjax.detect --model=gs://...`` runs it with its output there."""
    from lungjax import fileio

    cfg = tmp_path / "dou_gcs.py"
    cfg.write_text(E2E_CONFIG.format(path=str(ROOT / "configs" / "dou2017.py"),
                                     cache=tiny_data_cache))
    env = dict(os.environ, **gcs)

    def run(*args, module="lungjax.main"):
        r = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                           capture_output=True, **UTF8, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout

    work = "gs://bkt/runs/dou"
    run(f"--config={cfg}", f"--workdir={work}")
    names = set(fileio.listdir(work))
    assert {"fcn", "screen", "fpr", "classify", "fold.json"} <= names, names
    for stage in ("fcn", "screen", "fpr", "classify"):
        assert fileio.isfile(f"{work}/{stage}/stage.json"), stage
    steps = fileio.listdir(f"{work}/fcn/checkpoints")
    assert "4" in steps, steps
    assert fileio.isfile(f"{work}/fcn/metrics.jsonl") and fileio.isdir(f"{work}/fcn/tb")
    assert fileio.isfile(f"{work}/classify/eval/submission.csv")
    assert fileio.isfile(f"{work}/classify/eval/froc.png")
    assert not (tmp_path / "gs:").exists()

    again = run(f"--config={cfg}", f"--workdir={work}")
    for stage in ("fcn", "screen", "fpr", "classify"):
        assert f"{stage}: done (gs://bkt/runs/dou/{stage}/stage.json)" in again

    out = run(f"--config={cfg}", f"--workdir={work}", "--mode=export")
    export = f"{work}/export"
    assert fileio.isfile(f"{export}/method.json"), out
    data = os.path.join(tiny_data_cache, "synthetic_tiny_seed0_v2", "luna16")
    mhd = sorted(p for p in _walk(data) if p.endswith(".mhd") and "seg-lungs" not in p)[0]
    pred = f"{work}/predict"
    run(f"--model={export}", f"--scan={mhd}", f"--out={pred}", "--no-png",
        module="lungjax.detect")
    assert fileio.isfile(f"{pred}/submission.csv") and fileio.isfile(f"{pred}/predict.json")
    with fileio.open_file(f"{pred}/predict.json") as f:
        record = json.load(f)
    assert record["model"] == export and not record["failed"], record


def _walk(root):
    for d, _, files in os.walk(root):
        for n in files:
            yield os.path.join(d, n)
