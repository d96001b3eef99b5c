"""lungjax entry point (kept short on purpose; the work is in train.py and friends).

    python -m lungjax.main --config=configs/dou2017.py[:variant] [--workdir=DIR] \
        [--mode=train|cv|evaluate|export] [--config.a.b=value ...]

Without ``--workdir`` the run goes to ``runs/<config.name>``. Multi-host: pass
``--coordinator=host:port --num_processes=N --process_id=i`` (or the LUNGJAX_* env vars).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Method config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
flags.DEFINE_enum("mode", "train", ["train", "cv", "evaluate", "export"], "What to do.")
flags.DEFINE_string("coordinator", None, "Multi-host coordinator address host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Orbax and Grain log every save/restore at INFO; keep the run's own output
        # readable unless -v/--verbosity asks for more.
        logging.set_verbosity(logging.WARNING)
    from lungjax import modes, sharding, train

    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    train.validate_config(config)
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    try:
        modes.run(FLAGS.mode, config, workdir)
    except train.NonFiniteLossError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
