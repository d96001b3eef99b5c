"""Cross-validation fanned out over a scheduler: one job per fold, then the report.

``python -m lungjax.main --config=CFG --mode=cv --cv_launch=KIND --workdir=DIR`` splits
the cross-validation into the steps of :func:`lungjax.stages.cross_validate`: "prepare"
(the data, once), "folds" (one job per fold: the same command with
``--config.cv.folds=(k,)``), "report" (whatever folds finished; the rest are listed as
missing). Every job is the same ``python -m lungjax.main`` command line with
``--cv_step`` added, so a job that fails is rerun as it is and resumes (finished stages
are skipped).

* ``slurm``: writes ``DIR/cv_launch/slurm/{prepare,folds,report}.sbatch`` and
  ``submit.sh`` (never submitted here): the folds as one job array (task i runs the i-th
  fold; ``--cv_nodes`` nodes each, the processes of a task joining one multi-host run
  through JAX's SLURM detection), after the prepare job, and the report after the array
  (``afterany``: it reports on the folds that finished).
* ``k8s``: writes ``DIR/cv_launch/k8s/jobset.yaml``, a JobSet (``jobset.x-k8s.io``):
  replicated jobs prepare -> folds (an Indexed Job, completion index i = the i-th fold)
  -> report, each started when the one before completed (``dependsOn``). The run folder
  and the data cache live on one PersistentVolumeClaim every pod mounts (``--cv_volume``),
  at the paths the launching command resolved; ``--cv_image`` holds lungjax and its
  configs at the launching command's working directory.
* ``local``: runs the fold jobs as processes on this machine, at most ``--cv_parallel``
  at a time (each with its log in ``DIR/cv_launch/local/fold_<k>.log``), then the report.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence

from lungjax import fileio

LAUNCHERS = ("slurm", "k8s", "local")
# The steps of a cross-validation (lungjax.stages.cross_validate), what the jobs run.
CV_STEPS = ("all", "prepare", "folds", "report")
# Flags of the launching command line that the jobs must not inherit (the jobs get their
# own --mode, --cv_step, folds and an absolute --workdir).
_LAUNCH_FLAGS = ("--cv_launch", "--cv_parallel", "--cv_nodes", "--cv_image", "--cv_volume",
                 "--cv_step", "--config.cv.folds", "--mode", "--workdir")
_BOOL_FLAGS = ("--restart", "--norestart")


def base_args(argv: Sequence[str], workdir: str) -> list[str]:
    """The launching command's own arguments (config, overrides) without the launch
    flags, with ``--workdir`` made absolute (jobs may start in another directory)."""
    keep = []
    skip_next = False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        name = a.split("=", 1)[0]
        if name in _LAUNCH_FLAGS:
            skip_next = "=" not in a  # "--flag value" spelling
            continue
        if name in _BOOL_FLAGS:  # --restart would move finished folds aside in every job
            continue
        keep.append(a)
    return keep + [f"--workdir={os.path.abspath(workdir)}"]


def job_args(base: Sequence[str], step: str, fold: int | None = None) -> list[str]:
    """The ``lungjax.main`` arguments of one job: :func:`base_args`, then ``--mode=cv
    --cv_step=STEP`` and, for a fold job, ``--config.cv.folds=(k,)``."""
    out = list(base) + ["--mode=cv", f"--cv_step={step}"]
    if fold is not None:
        out.append(f"--config.cv.folds=({int(fold)},)")
    return out


def _command(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "lungjax.main", *args])


def write_slurm(out_dir: str, argv: Sequence[str], folds: Sequence[int], *,
                name: str, nodes: int = 1) -> dict[str, str]:
    """The SLURM scripts (see the module docstring); returns {kind: path}."""
    from lungjax.atomic import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    folds = [int(k) for k in folds]
    fold_cmd = _command(job_args(argv, "folds"))
    head = ["#!/bin/bash", f"#SBATCH --job-name={name}-{{step}}",
            f"#SBATCH --output={os.path.join(out_dir, '%x-{log}.log')}", "set -euo pipefail",
            f"cd {shlex.quote(os.getcwd())}"]
    scripts = {
        "prepare": head + [_command(job_args(argv, "prepare"))],
        "folds": head[:2] + [f"#SBATCH --array=0-{len(folds) - 1}",
                             f"#SBATCH --nodes={int(nodes)}", "#SBATCH --ntasks-per-node=1"]
        + head[2:] + [
            f"FOLDS=({' '.join(str(k) for k in folds)})  # array task i runs fold FOLDS[i]",
            'FOLD="${FOLDS[$SLURM_ARRAY_TASK_ID]}"',
            "# srun starts one process per node; they join one run through JAX's SLURM",
            "# detection (lungjax.sharding.initialize_distributed).",
            f'srun {fold_cmd} "--config.cv.folds=($FOLD,)"'],
        "report": head + [_command(job_args(argv, "report"))],
    }
    paths = {}
    for step, lines in scripts.items():
        paths[step] = os.path.join(out_dir, f"{step}.sbatch")
        log = "%A_%a" if step == "folds" else "%j"  # array: job id and task id
        atomic_write_text(paths[step], "\n".join(
            ln.replace("{step}", step).replace("{log}", log) for ln in lines) + "\n")
    q = {k: shlex.quote(v) for k, v in paths.items()}
    paths["submit"] = os.path.join(out_dir, "submit.sh")
    atomic_write_text(paths["submit"], "\n".join([
        "#!/bin/bash",
        f"# {name}: prepare -> {len(folds)} fold jobs (array) -> report. Run it to submit.",
        "set -euo pipefail",
        f"prep=$(sbatch --parsable {q['prepare']})",
        f"folds=$(sbatch --parsable --dependency=afterok:$prep {q['folds']})",
        f"sbatch --dependency=afterany:$folds {q['report']}", ""]))
    os.chmod(paths["submit"], 0o755)
    return paths


def write_k8s(out_dir: str, argv: Sequence[str], folds: Sequence[int], *, name: str,
              image: str, volume: str, workdir: str, cache_dir: str, nodes: int = 1
              ) -> dict[str, str]:
    """The JobSet manifest (see the module docstring); returns {"jobset": path}. JSON is
    YAML, so ``kubectl apply -f`` reads the file as written. The claim ``volume`` is
    mounted at the run folder (its sub-path ``run``) and at the data cache (``data``),
    both at the paths this command line resolved, so every pod sees one run and one
    prepared store."""
    from lungjax.atomic import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    folds = [int(k) for k in folds]
    mounts = [{"name": "shared", "mountPath": os.path.abspath(cache_dir), "subPath": "data"}]
    if not fileio.is_url(workdir):  # a gs:// run folder needs no volume
        mounts.insert(0, {"name": "shared", "mountPath": os.path.abspath(workdir),
                          "subPath": "run"})
    job_name = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]

    def job(step: str, command: str, completions: int = 1, depends: str = "") -> dict:
        spec: dict = {"backoffLimit": 2, "completions": completions,
                      "parallelism": completions, "template": {"spec": {
                          "restartPolicy": "Never",
                          "containers": [{"name": "lungjax", "image": image,
                                          "workingDir": os.getcwd(),
                                          "command": ["bash", "-c", command],
                                          "volumeMounts": mounts}],
                          "volumes": [{"name": "shared",
                                       "persistentVolumeClaim": {"claimName": volume}}]}}}
        if completions > 1:
            spec["completionMode"] = "Indexed"  # JOB_COMPLETION_INDEX = 0 .. completions-1
        rj = {"name": step, "replicas": 1, "template": {"spec": spec}}
        if depends:
            rj["dependsOn"] = [{"name": depends, "status": "Complete"}]
        return rj

    fold_cmd = (f"FOLDS=({' '.join(str(k) for k in folds)}); exec "
                + _command(job_args(argv, "folds"))
                + ' "--config.cv.folds=(${FOLDS[$JOB_COMPLETION_INDEX]},)"')
    manifest = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": f"{job_name}-cv"},
        "spec": {"replicatedJobs": [
            job("prepare", "exec " + _command(job_args(argv, "prepare"))),
            job("folds", fold_cmd, completions=len(folds), depends="prepare"),
            job("report", "exec " + _command(job_args(argv, "report")), depends="folds"),
        ]},
    }
    if nodes > 1:
        manifest["metadata"]["annotations"] = {
            "lungjax/nodes-per-fold": str(nodes),
            "lungjax/note": "one pod per fold here; a multi-host fold needs a JobSet per "
                            "fold (pods joined by JAX's Kubernetes detection)"}
    path = os.path.join(out_dir, "jobset.yaml")
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return {"jobset": path}


def run_local(argv: Sequence[str], folds: Sequence[int], *, parallel: int, log_dir: str
              ) -> dict[int, int]:
    """Runs the fold jobs here, at most ``parallel`` at a time, each as its own process
    (``python -m lungjax.main ...``, output in ``log_dir/fold_<k>.log``), printing each
    fold as it ends. Returns {fold: exit code}."""
    os.makedirs(log_dir, exist_ok=True)
    pending = [int(k) for k in folds]
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    codes: dict[int, int] = {}
    parallel = max(1, int(parallel))
    while pending or running:
        while pending and len(running) < parallel:
            k = pending.pop(0)
            log = open(os.path.join(log_dir, f"fold_{k}.log"), "w", encoding="utf-8")
            cmd = [sys.executable, "-m", "lungjax.main", *job_args(argv, "folds", k)]
            running[k] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                          time.perf_counter(), log)
            print(f"cv: fold {k} started ({len(running)} running, {len(pending)} waiting)",
                  flush=True)
        time.sleep(0.5)
        for k, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            codes[k] = proc.returncode
            del running[k]
            how = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"cv: fold {k} {how} in {time.perf_counter() - t0:.0f} s; log "
                  f"{os.path.join(log_dir, f'fold_{k}.log')}", flush=True)
    return codes


def launch(kind: str, argv: Sequence[str], config, workdir: str, *, parallel: int = 1,
           nodes: int = 1, image: str = "", volume: str = "") -> dict:
    """``--cv_launch=KIND``: writes the scheduler's files (slurm, k8s) or runs the folds
    here (local, then the report). Returns what was written or run."""
    from lungjax import stages

    if kind not in LAUNCHERS:
        raise ValueError(f"--cv_launch={kind!r}: expected one of {LAUNCHERS}")
    folds = stages.cv_folds(config)
    argv = base_args(argv, workdir)
    # The scheduler's files and the local folds' logs are local files even when the
    # run folder is a bucket (sbatch and kubectl read local files).
    out = os.path.join(os.path.abspath("cv_launch") if fileio.is_url(workdir)
                       else os.path.join(workdir, "cv_launch"), kind)
    if kind == "slurm":
        files = write_slurm(out, argv, folds, name=config.name, nodes=nodes)
        print(f"cv: SLURM scripts for {len(folds)} folds in {out}; submit with "
              f"{files['submit']}", flush=True)
        return {"files": files, "folds": folds}
    if kind == "k8s":
        if not image or not volume:
            raise ValueError("--cv_launch=k8s needs --cv_image (a container image with "
                             "lungjax) and --cv_volume (the PersistentVolumeClaim holding "
                             "--workdir)")
        files = write_k8s(out, argv, folds, name=config.name, image=image, volume=volume,
                          workdir=workdir, cache_dir=config.data.cache_dir, nodes=nodes)
        print(f"cv: JobSet for {len(folds)} folds: kubectl apply -f {files['jobset']}",
              flush=True)
        return {"files": files, "folds": folds}
    stages.cross_validate(config, workdir, step="prepare")  # once, before the folds start
    codes = run_local(argv, folds, parallel=parallel, log_dir=out)
    report = stages.cross_validate(config, workdir, step="report")
    failed = sorted(k for k, c in codes.items() if c != 0)
    if failed:
        print(f"cv: fold(s) {failed} failed (logs in {out}); rerun the same command to "
              "resume them", flush=True)
    return {"report": report, "exit_codes": codes, "failed": failed}
