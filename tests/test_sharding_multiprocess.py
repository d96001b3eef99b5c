"""Two processes on localhost (CPU collectives over gloo) train together and agree."""

import os
import pathlib
import socket
import sys
import textwrap

import numpy as np
from conftest import run_together

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from lungjax import sharding
    assert sharding.initialize_distributed()  # from the LUNGJAX_* environment
    import jax
    from test_engine import tiny_config, toy_patches
    from lungjax import train
    from lungjax.train_data import ArrayTrainData

    c = tiny_config(num_steps=4, checkpoint_every=2, log_every=2)
    c.evals.patches.every_steps = 0
    images, labels = toy_patches(64)
    data = ArrayTrainData(images[:48], labels[:48], batch_size=8, seed=1,
                          val_images=images[48:], val_labels=labels[48:],
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
    r = train.train_and_evaluate(c, sys.argv[1], data=data)
    assert jax.device_count() == 4 and jax.process_count() == 2
    flat = np.concatenate([np.asarray(x).ravel() for x in
                           jax.tree_util.tree_leaves(jax.device_get(r["state"].params))])
    np.save(sys.argv[2], flat)
    np.save(sys.argv[3], data.state_dict()["last_loss"])
    print("AUC", r["eval/patches"]["auc"])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree(tmp_path):
    port = _free_port()
    commands = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   LUNGJAX_COORDINATOR=f"127.0.0.1:{port}", LUNGJAX_NUM_PROCESSES="2",
                   LUNGJAX_PROCESS_ID=str(pid))
        commands.append(([sys.executable, "-c", WORKER.format(tests=str(TESTS)),
                          str(tmp_path / "run"), str(tmp_path / f"params{pid}.npy"),
                          str(tmp_path / f"sampler{pid}.npy")], env))
    outs = run_together(commands)
    p0, p1 = (np.load(tmp_path / f"params{i}.npy") for i in range(2))
    np.testing.assert_array_equal(p0, p1)
    assert np.all(np.isfinite(p0))
    # every host fed the *global* batch's outputs to its sampler: identical host state
    s0, s1 = (np.load(tmp_path / f"sampler{i}.npy") for i in range(2))
    np.testing.assert_array_equal(s0, s1)
    assert np.isfinite(s0).sum() >= 16  # at least one global batch of distinct samples seen
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[:2] == ["2", "4"]
    assert "AUC" in outs[0]
