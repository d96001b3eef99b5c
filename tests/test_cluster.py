"""Running on clusters: JAX's cluster detection joins one multi-host run (two local
processes under SLURM's environment, against one process with the same global batch),
one run per run folder (the lock), and cross-validation fanned out over SLURM, Kubernetes
or local processes."""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from conftest import UTF8, load_config, run_together

from lungjax import cv_launch, sharding
from lungjax.runlock import RunFolderBusy, run_folder_lock

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID", "LUNGJAX_COORDINATOR", "LUNGJAX_NUM_PROCESSES",
              "LUNGJAX_PROCESS_ID")


def _slurm_env(job_id: int, ntasks: int, rank: int) -> dict:
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank)}


def test_detect_cluster_finds_slurm_and_a_single_task_stays_single(monkeypatch):
    for v in SLURM_VARS:
        monkeypatch.delenv(v, raising=False)
    assert sharding.detect_cluster() is None
    assert sharding.initialize_distributed() is None  # nothing asks for multi-host
    for k, v in _slurm_env(77, 1, 0).items():
        monkeypatch.setenv(k, v)
    assert sharding.detect_cluster() == ("slurm", 1)
    assert sharding.initialize_distributed() is None  # sbatch with one task: one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.detect_cluster() == ("slurm", 4)


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from lungjax import sharding
    joined = sharding.initialize_distributed()  # no flags: from the cluster's environment
    import jax
    print("joined", joined, jax.process_index(), jax.process_count(), jax.device_count())
    from test_engine import tiny_config, toy_patches
    from lungjax import train
    from lungjax.train_data import ArrayTrainData

    c = tiny_config(num_steps=4, checkpoint_every=2, log_every=2)
    c.evals.patches.every_steps = 0
    # Every sample of the global batch counts (OSF's random half would pick by position).
    c.train.osf.enabled = False
    images, labels = toy_patches(64)
    # A global batch of 16: the hosts' interleaved shares of one shuffled order.
    data = ArrayTrainData(images[:48], labels[:48], batch_size=16 // jax.process_count(),
                          seed=1,
                          val_images=images[48:], val_labels=labels[48:],
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
    r = train.train_and_evaluate(c, sys.argv[1], data=data)
    flat = np.concatenate([np.asarray(x).ravel() for x in
                           jax.tree_util.tree_leaves(jax.device_get(r["state"].params))])
    np.save(sys.argv[2], flat)
    np.save(sys.argv[2].replace(".npy", "_sampler.npy"), data.state_dict()["last_loss"])
""")


def _slurm_job_id() -> int:
    """A job id whose SLURM coordinator port (JAX: id % 4096 + 61440) is free here."""
    for _ in range(50):
        port = random.randint(61440, 65535)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 100 + port - 61440
    pytest.skip("no free port in SLURM's coordinator range")


def _run_workers(tmp_path, envs, tag):
    base = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    return run_together([([sys.executable, "-c", WORKER.format(tests=str(TESTS)),
                           str(tmp_path / tag), str(tmp_path / f"{tag}{i}.npy")],
                          dict(base, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra))
                         for i, extra in enumerate(envs)])


def test_two_processes_under_srun_join_one_run_and_match_one_process(tmp_path):
    """What ``srun -n 2`` sets (SLURM_*), no lungjax flags: the two processes find each
    other through JAX's SLURM detection, run as one 2 x 2-device run, and end with the
    parameters of one 4-device process trained on the same global batches."""
    job = _slurm_job_id()
    two = [dict(_slurm_env(job, 2, r), XLA_FLAGS="--xla_force_host_platform_device_count=2")
           for r in range(2)]
    outs = _run_workers(tmp_path, two, "slurm")
    for r, out in enumerate(outs):
        assert f"joined slurm {r} 2 4" in out, out[-2000:]
    one = _run_workers(tmp_path, [dict(XLA_FLAGS="--xla_force_host_platform_device_count=4")],
                       "single")
    assert "joined None 0 1 4" in one[0]
    p0, p1, ref = (np.load(tmp_path / n) for n in ("slurm0.npy", "slurm1.npy", "single0.npy"))
    np.testing.assert_array_equal(p0, p1)
    np.testing.assert_allclose(p0, ref, rtol=1e-5, atol=1e-6)
    # every host fed the *global* batch's outputs to its sampler: identical host state
    s0, s1 = (np.load(tmp_path / f"slurm{i}_sampler.npy") for i in range(2))
    np.testing.assert_array_equal(s0, s1)
    assert np.isfinite(s0).sum() >= 16  # at least one global batch of distinct samples seen
    assert sorted(os.listdir(tmp_path / "slurm" / "checkpoints"))[:2] == ["2", "4"]
    print(f"2 processes x 2 devices vs 1 x 4: max |diff| {np.abs(p0 - ref).max():.2e} over "
          f"{p0.size} parameters")


def test_a_run_folder_is_held_by_one_run(tmp_path):
    """A second run on a folder another live run holds stops with one line naming the
    holder; once the holder is gone (killed: no clean-up) the folder is free again."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from lungjax.runlock import run_folder_lock
            with run_folder_lock({str(folder)!r}, process_count=2):
                print("held", flush=True)
                sys.stdin.readline()
        """)], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, **UTF8)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"{folder}: in use by another run \(host "
                                                rf".*, pid {holder.pid}, 2 process"):
            with run_folder_lock(folder):
                pass
        # the command line: one line, nothing run
        cli = subprocess.run([sys.executable, "-m", "lungjax.main",
                              "--config=configs/dou2017.py:tiny", f"--workdir={folder}"],
                             cwd=ROOT, capture_output=True, **UTF8, timeout=300)
        assert cli.returncode != 0
        err = [ln for ln in cli.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], cli.stderr[-2000:]
        assert sorted(p.name for p in folder.iterdir()) == [".lungjax.lock"]
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(folder) as path:  # the kernel dropped the dead holder's lock
        assert json.loads(pathlib.Path(path).read_text(encoding="utf-8"))["pid"] == os.getpid()
    with run_folder_lock(folder, process_index=1) as path:  # other processes take none
        assert path is None


def test_slurm_scripts_and_k8s_jobset_name_every_fold(tmp_path, capsys):
    """``--cv_launch=slurm`` / ``k8s`` write (never submit) the jobs: each script passes
    ``bash -n``, the fold array runs every fold once, the JobSet parses as YAML with one
    indexed task per fold, prepare -> folds -> report."""
    argv = ["--config=configs/dou2017.py:tiny", "--mode=cv", "--cv_launch=slurm",
            "--config.data.synthetic_seed=3", "--restart", "--workdir", "old"]
    folds = [0, 3, 7]
    work = tmp_path / "cv"
    base = cv_launch.base_args(argv, str(work))
    assert base == ["--config=configs/dou2017.py:tiny", "--config.data.synthetic_seed=3",
                    f"--workdir={work}"]
    files = cv_launch.write_slurm(str(tmp_path / "slurm"), base, folds, name="m", nodes=2)
    for path in files.values():
        subprocess.run(["bash", "-n", path], check=True)
    text = pathlib.Path(files["folds"]).read_text(encoding="utf-8")
    assert "#SBATCH --array=0-2" in text and "FOLDS=(0 3 7)" in text
    assert "#SBATCH --nodes=2" in text and "--cv_step=folds" in text
    # task i of the array runs fold FOLDS[i]: the line bash would run, for each task
    for i, k in enumerate(folds):
        line = [ln for ln in text.splitlines() if ln.startswith("srun ")][0]
        shown = subprocess.run(["bash", "-c", f"FOLDS=(0 3 7); SLURM_ARRAY_TASK_ID={i}; "
                                f'FOLD="${{FOLDS[$SLURM_ARRAY_TASK_ID]}}"; '
                                f"printf '%s\\n' {line[len('srun '):]}"],
                               capture_output=True, **UTF8, check=True).stdout.split("\n")
        assert f"--config.cv.folds=({k},)" in shown and f"--workdir={work}" in shown
    assert "--cv_step=prepare" in pathlib.Path(files["prepare"]).read_text(encoding="utf-8")
    assert "--cv_step=report" in pathlib.Path(files["report"]).read_text(encoding="utf-8")
    submit = pathlib.Path(files["submit"]).read_text(encoding="utf-8")
    assert "afterok:$prep" in submit and "afterany:$folds" in submit

    k8s = cv_launch.write_k8s(str(tmp_path / "k8s"), base, folds, name="dou2017_tiny",
                              image="registry/lungjax:1", volume="runs",
                              workdir=str(work), cache_dir="data_cache")
    m = yaml.safe_load(pathlib.Path(k8s["jobset"]).read_text(encoding="utf-8"))
    assert m["kind"] == "JobSet" and m["metadata"]["name"] == "dou2017-tiny-cv"
    jobs = {j["name"]: j for j in m["spec"]["replicatedJobs"]}
    assert list(jobs) == ["prepare", "folds", "report"]
    assert jobs["folds"]["dependsOn"] == [{"name": "prepare", "status": "Complete"}]
    assert jobs["report"]["dependsOn"] == [{"name": "folds", "status": "Complete"}]
    spec = jobs["folds"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 3
    cmd = spec["template"]["spec"]["containers"][0]["command"][2]
    for i, k in enumerate(folds):
        shown = subprocess.run(["bash", "-c", cmd.replace("exec python -m lungjax.main",
                                                          "printf '%s\\n'")],
                               env=dict(os.environ, JOB_COMPLETION_INDEX=str(i)),
                               capture_output=True, **UTF8, check=True).stdout
        assert f"--config.cv.folds=({k},)" in shown.split("\n")
    mounts = spec["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {mt["mountPath"] for mt in mounts} == {str(work), os.path.abspath("data_cache")}


CV_CONFIG = textwrap.dedent("""
    import importlib.util
    _spec = importlib.util.spec_from_file_location("dou", {path!r})
    _m = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_m)

    def get_config(arg=None):
        c = _m.get_config("tiny,steps=4")
        c.data.cache_dir = {cache!r}  # this test's own: its processes prepare it once
        # The FCN stage alone (held-out patch figures per fold): the fan-out, not the
        # method, is under test, and each fold process compiles its own networks.
        c.stages = dict(fcn=c.stages.fcn.to_dict())
        c.stage_order = ("fcn",)
        c.cv.folds = (0, 1)
        c.cv.variants = {{}}
        c.cv.report = ""
        return c
""")


@pytest.mark.slow
def test_local_parallel_cv_writes_the_sequential_report(tmp_path, capsys):
    """``--cv_launch=local --cv_parallel=2``: dou2017 ``tiny`` folds 0 and 1 (its FCN
    stage) as two processes at once, then the report; the same figures as ``--mode=cv`` in
    one process.
    A report run before any fold finished names the missing folds."""
    cfg = tmp_path / "dou_cv.py"
    cfg.write_text(CV_CONFIG.format(path=str(ROOT / "configs" / "dou2017.py"),
                                    cache=str(tmp_path / "data_cache")))

    def main(*args):
        r = subprocess.run([sys.executable, "-m", "lungjax.main", f"--config={cfg}", *args],
                           cwd=ROOT, capture_output=True, **UTF8, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout

    import time

    t0 = time.perf_counter()
    main("--mode=cv", f"--workdir={tmp_path / 'seq'}")  # first: it also makes the data
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    par = main("--mode=cv", "--cv_launch=local", "--cv_parallel=2",
               f"--workdir={tmp_path / 'par'}")
    t_par = time.perf_counter() - t0
    assert "cv: fold 0 done" in par and "cv: fold 1 done" in par
    with capsys.disabled():
        print(f"tiny 2-fold CV: local --cv_parallel=2 {t_par:.0f} s, sequential {t_seq:.0f} s")
    a, b = (json.loads((tmp_path / d / "cv" / "cv_report.json").read_text(encoding="utf-8"))
            for d in ("par", "seq"))
    assert a["folds"] == b["folds"] == ["0", "1"] and a["missing_folds"] == []
    assert a["metrics"].keys() == b["metrics"].keys() and len(a["metrics"]) > 5
    for name in a["metrics"]:
        if "seconds" in name:  # wall-clock: the one figure that may differ
            continue
        np.testing.assert_allclose(np.asarray(a["metrics"][name]["per_fold"], float),
                                   np.asarray(b["metrics"][name]["per_fold"], float),
                                   rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=name)
    # the report step alone, with fold 1 unfinished: fold 0's report, fold 1 named
    from lungjax import stages

    os.remove(tmp_path / "seq" / "fold_1" / "fold.json")
    stages.run("cv", load_config(cfg), str(tmp_path / "seq"), cv_step="report")
    assert "fold(s) [1] have not finished" in capsys.readouterr().out
    rep = json.loads((tmp_path / "seq" / "cv" / "cv_report.json").read_text(encoding="utf-8"))
    assert rep["folds"] == ["0"] and rep["missing_folds"] == [1]
    assert "Not finished (not in this report): fold(s) 1." in (
        tmp_path / "seq" / "cv" / "cv_report.md").read_text(encoding="utf-8")


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    """Some network mounts refuse flock: the run goes on, saying it cannot be guarded."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="cannot lock the run folder .No locks available"):
        with run_folder_lock(tmp_path / "nfs") as path:
            assert json.loads(pathlib.Path(path).read_text(encoding="utf-8"))["pid"] == os.getpid()
