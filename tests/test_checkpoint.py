"""Checkpoints: SIGKILL mid-run + resume == uninterrupted; SIGTERM saves and stops;
host-state round trip."""

import os
import pathlib
import signal
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import run_until_killed
from lungjax import train
from lungjax.checkpointing import Checkpointer, _from_host_tree, _host_tree
from lungjax.train_data import ArrayTrainData

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import shared_engine, tiny_config, toy_patches  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
NUM_STEPS = 10


def _config():
    c = tiny_config(num_steps=NUM_STEPS, checkpoint_every=3, log_every=100,
                    async_checkpoint=True)
    c.sampler.steps_per_round = 4  # rounds rebuild the index, also across a resume
    c.evals.patches.every_steps = 0
    return c


def _data():
    images, labels = toy_patches(48)
    return ArrayTrainData(images, labels, batch_size=16, seed=3, steps_per_round=4)


def _params(result):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(result["state"].params))


@pytest.fixture(scope="module")
def engine():
    return shared_engine(_config())  # compiled once, shared by the runs below


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engine):
    data = _data()
    result = train.train_and_evaluate(_config(), str(tmp_path_factory.mktemp("ref")), data=data,
                                      engine=engine)
    return _params(result), data.state_dict()


class SignalAt:
    """Wraps a TrainData; sends ``sig`` to this process when batch number ``at`` is asked."""

    def __init__(self, data, at, sig):
        self.data, self.at, self.sig, self.n = data, at, sig, 0
        self.steps_per_round = data.steps_per_round

    def iterator(self, r):
        self.it = self.data.iterator(r)
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), self.sig)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)

    def __getattr__(self, name):
        return getattr(self.data, name)


KILLED_RUN = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import SignalAt, _config, _data
    from lungjax import train

    train.train_and_evaluate(_config(), sys.argv[1], data=SignalAt(_data(), 8, signal.SIGKILL))
""")


def _resume_equals_reference(workdir, engine, ref_params):
    """Resumes the run in ``workdir`` to the end; its params must equal the reference's.

    Returns the run's training data (its sampler state, for further checks).
    """
    data = _data()
    result = train.train_and_evaluate(_config(), str(workdir), data=data, engine=engine)
    assert result["step"] == NUM_STEPS and not result["preempted"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(result), ref_params)
    return data


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, engine):
    ref_params, ref_sampler = reference
    workdir = tmp_path / "run"
    run_until_killed(KILLED_RUN.format(tests=str(TESTS)), workdir)
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert steps and 3 <= max(steps) < NUM_STEPS, steps

    data = _resume_equals_reference(workdir, engine, ref_params)
    np.testing.assert_array_equal(data.state_dict()["last_loss"], ref_sampler["last_loss"])


def test_sigterm_saves_and_stops_then_resumes(tmp_path, reference, engine):
    ref_params, _ = reference
    result = train.train_and_evaluate(_config(), str(tmp_path),
                                      data=SignalAt(_data(), 3, signal.SIGTERM), engine=engine)
    assert result["preempted"] and result["step"] == 3
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    _resume_equals_reference(tmp_path, engine, ref_params)


def test_host_state_tree_round_trip():
    tree = {"round": 3, "sampler": {"scores": np.arange(5, dtype=np.float32), "empty": {},
                                    "names": [np.int64(1), 2.5], "none": None}}
    back = _from_host_tree(_host_tree(tree))
    assert back["round"] == 3 and back["sampler"]["empty"] == {}
    assert back["sampler"]["none"] is None and back["sampler"]["names"] == [1, 2.5]
    np.testing.assert_array_equal(back["sampler"]["scores"], tree["sampler"]["scores"])
