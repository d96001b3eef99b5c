"""Multi-host start-up from explicit flags or LUNGJAX_* variables (what is passed to
``jax.distributed.initialize``); two real processes joining one run are in
``test_cluster.py`` (SLURM's environment, no flags)."""

import jax
import pytest

from lungjax import sharding

ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
       "SLURM_LOCALID", "LUNGJAX_COORDINATOR", "LUNGJAX_NUM_PROCESSES", "LUNGJAX_PROCESS_ID")


@pytest.fixture
def calls(monkeypatch):
    """jax.distributed.initialize and jax.config.update, recorded instead of run."""
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(("init", kw)))
    monkeypatch.setattr(jax.config, "update", lambda k, v: seen.append(("config", k, v)))
    for v in ENV:
        monkeypatch.delenv(v, raising=False)
    return seen


def test_flags_and_lungjax_variables_start_a_run_and_win_over_the_cluster(calls, monkeypatch):
    monkeypatch.setattr(sharding, "runs_on_cpu", lambda: True)
    monkeypatch.setenv("LUNGJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("LUNGJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("LUNGJAX_PROCESS_ID", "2")
    for k, v in {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "8",
                 "SLURM_PROCID": "5", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)  # a cluster is there too: the explicit setting wins
    assert sharding.initialize_distributed() == "flags"
    assert calls == [("config", "jax_cpu_collectives_implementation", "gloo"),
                     ("init", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                               "process_id": 2})]
    calls.clear()
    # arguments (the command line's flags) win over the variables
    assert sharding.initialize_distributed("h:1", 2, 1) == "flags"
    assert calls[-1] == ("init", {"coordinator_address": "h:1", "num_processes": 2,
                                  "process_id": 1})


def test_gloo_only_on_cpu_and_a_process_id_is_required(calls, monkeypatch):
    monkeypatch.setattr(sharding, "runs_on_cpu", lambda: False)
    assert sharding.initialize_distributed("h:1", 2, 0) == "flags"
    assert [c[0] for c in calls] == ["init"]  # no gloo on an accelerator
    with pytest.raises(ValueError, match="--process_id"):
        sharding.initialize_distributed("h:1", 2, None)
    assert sharding.initialize_distributed("h:1", 1, 0) is None  # one process: no start
