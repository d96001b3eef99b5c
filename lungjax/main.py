"""lungjax entry point (kept short on purpose; the work is in stages.py and train.py).

    python -m lungjax.main --config=configs/dou2017.py[:variant] [--workdir=DIR] \
        [--mode=train|cv|evaluate|export] [--restart] [--config.a.b=value ...]

Without ``--workdir`` the run goes to ``runs/<config.name>``. Multi-host: under ``srun``,
on a Cloud TPU pod slice, with Open MPI or on Kubernetes the processes find each other
(JAX's cluster detection, ``lungjax.sharding.initialize_distributed``); elsewhere pass
``--coordinator=host:port --num_processes=N --process_id=i`` (or the LUNGJAX_* env vars).
Cross-validation over a scheduler: ``--mode=cv --cv_launch=slurm|k8s|local``
(``lungjax/cv_launch.py``).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lungjax.cv_launch import CV_STEPS, LAUNCHERS  # standard library only: no JAX yet

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Method config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
flags.DEFINE_enum("mode", "train", ["train", "cv", "evaluate", "export"], "What to do.")
flags.DEFINE_bool("restart", False, "Start over every stage whose folder holds results of "
                  "another configuration (the old folder is kept beside it).")
flags.DEFINE_string("coordinator", None, "Multi-host coordinator address host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.DEFINE_enum("cv_launch", None, list(LAUNCHERS),
                  "--mode=cv over a scheduler, one job per fold, then the report: write "
                  "SLURM scripts or a Kubernetes JobSet (never submitted), or run the folds "
                  "as local processes (lungjax/cv_launch.py).")
flags.DEFINE_integer("cv_parallel", 1, "--cv_launch=local: folds running at once.")
flags.DEFINE_integer("cv_nodes", 1, "--cv_launch=slurm: nodes per fold job (one multi-host "
                     "run each).")
flags.DEFINE_string("cv_image", "", "--cv_launch=k8s: the container image with lungjax.")
flags.DEFINE_string("cv_volume", "", "--cv_launch=k8s: the PersistentVolumeClaim holding "
                    "--workdir and the data cache.")
flags.DEFINE_enum("cv_step", "all", list(CV_STEPS),
                  "--mode=cv, one step: the data only, the folds without the report, or the "
                  "report from the folds that finished (what --cv_launch's jobs run).")
flags.mark_flags_as_required(["config"])


def _configure_malloc(config, program: str = "lungjax.main") -> None:
    """Applies ``config.runtime.huge_pages`` (for ``python -m <program>``, by restarting it
    once) and ``keep_freed_memory``; must run before JAX starts a backend.

    XLA:CPU allocates its buffers afresh at every call and glibc maps and unmaps the large
    ones, so each step page-faults its whole working set again
    (``lungjax.models.conv.malloc``). The setting only reaches XLA's worker threads if made
    before they exist (set after the backend started, it leaves the faults as they were).
    """
    from lungjax.sharding import runs_on_cpu

    if not runs_on_cpu():
        return
    from lungjax.models.conv import malloc

    if config.runtime.huge_pages:
        malloc.reexec_with_huge_pages(program)  # returns only if no restart was needed
        if malloc.huge_pages_on():
            print("runtime.huge_pages: glibc malloc backs large blocks with transparent huge "
                  f"pages (GLIBC_TUNABLES={malloc.THP_ENV['GLIBC_TUNABLES']})", flush=True)
    if not config.runtime.keep_freed_memory:
        return
    if malloc.keep_freed_memory():
        print("runtime.keep_freed_memory: glibc malloc keeps freed memory (fewer page faults "
              "per step; resident memory stays at its peak)", flush=True)
    else:
        print("runtime.keep_freed_memory: no glibc malloc here; allocator left as it is",
              flush=True)


def _verbose(argv) -> bool:
    """Whether the command line asks for tracebacks (``-v`` / ``--verbosity``)."""
    return any(a == "-v" or a.startswith(("--verbosity", "-v=")) for a in argv[1:])


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        # A config file's own exception, wrapped by absl: its last line, without the type.
        lines = [re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])]
    text = " ".join(" ".join(lines).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError, KeyError)) \
        else f"{type(e).__name__}: {text}"


def _parse_flags(argv):
    """absl's flag parsing, with a missing config file, a bad variant or an unknown
    ``--config.`` override reported in one line naming it (a traceback with -v)."""
    for a in argv[1:]:
        if a.startswith("--config="):
            path = a.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise SystemExit(f"error: --config: no such config file {path!r}")
    if _verbose(argv):
        return FLAGS(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:  # absl names the flag; the text is the whole message
        raise SystemExit(f"error: {_one_line(ValueError(str(e)))}") from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no field
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        bad = [g for g in given if repr(g.rsplit(".", 1)[-1]) in str(e)] or given
        src = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
        raise SystemExit(f"error: {' '.join(bad) or '--config'}: no such field in the config "
                         f"of {src} (an override changes a field it has; "
                         "lungjax/config_schema.py declares them)") from None
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {_one_line(e)}") from None


def main(argv):
    run_one_line(_main, argv)


def run_one_line(fn, argv) -> None:
    """Runs a command's ``fn()``: quiet logging and any error as one line, unless
    -v/--verbosity asks for more (then the traceback)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    verbose = FLAGS["verbosity"].present
    if not verbose:
        # Orbax and Grain log every save/restore at INFO; keep the run's own output
        # readable unless -v/--verbosity asks for more.
        logging.set_verbosity(logging.WARNING)
    try:
        fn()
    except (Exception, KeyboardInterrupt) as e:
        if verbose or isinstance(e, KeyboardInterrupt):
            raise
        # One line naming the field, file or stage; --verbosity=1 shows the traceback.
        raise SystemExit(f"error: {_one_line(e)} (--verbosity=1 for the traceback)") \
            from None


def _main():
    try:
        config = FLAGS.config
    except (OSError, ValueError, AttributeError) as e:  # the config file failed to load
        raise ValueError(f"--config: {_one_line(e)}") from None
    _configure_malloc(config)  # first: before anything can start a JAX backend
    from lungjax import sharding, stages, train

    if FLAGS.cv_launch and FLAGS.mode != "cv":
        raise ValueError(f"--cv_launch={FLAGS.cv_launch} launches --mode=cv, not "
                         f"--mode={FLAGS.mode}")
    joined = sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes,
                                             FLAGS.process_id)
    if joined:
        import jax

        print(f"multi-host run ({joined}): process {jax.process_index()} of "
              f"{jax.process_count()}, {jax.device_count()} devices", flush=True)
    train.validate_config(config)
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    if FLAGS.cv_launch:
        from lungjax import cv_launch

        out = cv_launch.launch(FLAGS.cv_launch, sys.argv[1:], config, workdir,
                               parallel=FLAGS.cv_parallel, nodes=FLAGS.cv_nodes,
                               image=FLAGS.cv_image, volume=FLAGS.cv_volume)
        if out.get("failed"):
            raise SystemExit(1)
        return
    stages.run(FLAGS.mode, config, workdir, restart=FLAGS.restart, cv_step=FLAGS.cv_step)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
