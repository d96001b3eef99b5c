"""Configs: every field declared, required placeholders fail loudly, command-line
overrides are type-checked and unknown fields rejected."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import load_config  # noqa: E402  (tests/ is on sys.path under pytest)
from lungjax import train
from lungjax.configcheck import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOU = str(ROOT / "configs" / "dou2017.py")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse(*args):
    fv = flags.FlagValues()
    argv = ["prog", *args]
    # Override flags are discovered from the argv the config flag is given.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def test_base_config_lists_every_required_field():
    c = _load("base").get_config()
    missing = train.missing_required(c)
    assert set(missing) == {"name", "data.patch_size_zyx", "model.name",
                            "optimizer.learning_rate", "train.batch_size", "train.num_steps"}
    with pytest.raises(ValueError, match="train.batch_size"):
        train.validate_config(c)


@pytest.mark.parametrize("arg", ["tiny", "", "tiny,fold=3"])
def test_dou2017_variants_are_complete(arg):
    c = _load("dou2017").get_config(arg)
    train.validate_config(c)
    assert tuple(c.data.patch_size_zyx) == (10, 30, 30)
    assert c.model.name == "dou2017_fcn" and c.train.osf.enabled
    if "fold=3" in arg:
        assert c.data.fold == 3


def test_dou2017_rejects_unknown_variant_and_arg():
    mod = _load("dou2017")
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        mod.get_config("huge")
    with pytest.raises(ValueError, match="unknown config arg 'colour'"):
        mod.get_config("tiny,colour=red")


def test_command_line_overrides_are_typed():
    c = _parse(f"--config={DOU}:tiny", "--config.train.batch_size=32",
               "--config.optimizer.learning_rate=0.01", "--config.data.patch_size_zyx=(8,24,24)")
    assert c.train.batch_size == 32 and c.optimizer.learning_rate == 0.01
    assert tuple(c.data.patch_size_zyx) == (8, 24, 24)
    with pytest.raises(flags.IllegalFlagValueError, match="batch_size"):
        _parse(f"--config={DOU}:tiny", "--config.train.batch_size=abc")


def test_command_line_rejects_unknown_field():
    with pytest.raises((flags.UnrecognizedFlagError, KeyError, AttributeError),
                       match="no_such_field"):
        _parse(f"--config={DOU}:tiny", "--config.train.no_such_field=1")


def test_main_reports_bad_override_naming_the_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lungjax.main", f"--config={DOU}:tiny",
         f"--workdir={tmp_path}", "--config.train.num_steps=many"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "num_steps" in proc.stderr
    assert not (tmp_path / "config.json").exists()


def test_unknown_registry_names_are_errors():
    c = _load("dou2017").get_config("tiny")
    c.model.name = "no_such_model"
    with pytest.raises(KeyError, match="unknown model 'no_such_model'.*dou2017_fcn"):
        train.build_model(c)


def test_resolved_config_is_json(tmp_path):
    c = _load("dou2017").get_config("tiny")
    train._write_config(c, str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert d["model"]["name"] == "dou2017_fcn" and d["data"]["patch_size_zyx"] == [10, 30, 30]


def test_malloc_setting_applies_only_when_asked_and_on_cpu(monkeypatch):
    from ml_collections import config_dict

    from lungjax import main as cli
    from lungjax.models.conv import malloc as conv_malloc

    calls = []
    monkeypatch.setattr(conv_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = config_dict.ConfigDict({"runtime": {"keep_freed_memory": False,
                                              "huge_pages": True}})  # pytest: no restart
    cli._configure_malloc(cfg)
    assert calls == []  # off by default: it raises peak memory (configs/base.py)
    cfg.runtime.keep_freed_memory = True
    from lungjax import sharding

    monkeypatch.setattr(sharding, "runs_on_cpu", lambda: True)
    cli._configure_malloc(cfg)
    assert calls == [1]
    monkeypatch.setattr(sharding, "runs_on_cpu", lambda: False)
    cli._configure_malloc(cfg)
    assert calls == [1]  # not on an accelerator


# ----------------------------------------------------------------------------- contract

METHOD_FILES = sorted(p.relative_to(ROOT) for p in [*(ROOT / "configs").glob("*.py"),
                                                     *(ROOT / "configs" / "baselines").glob("*.py")]
                      if p.stem != "base" and not p.stem.startswith("_"))


@pytest.mark.parametrize("path", METHOD_FILES, ids=str)
@pytest.mark.parametrize("variant", ["tiny", "default", "paper"])
def test_every_method_variant_reads_only_declared_fields(path, variant, monkeypatch):
    """Method, baseline, every stage config and every cv variant's: no field that
    nothing declares."""
    from lungjax import stages
    from lungjax.registry import STAGE_CONFIGS

    # Derived fields (steps from the number of training scans) need the prepared store;
    # they set declared fields only.
    monkeypatch.setattr(STAGE_CONFIGS, "get", lambda name: lambda cfg, config: None)
    c = load_config(path, variant)
    train.validate_config(c)
    for cfg in [c, *(stages.variant_config(c, v) for v in c.cv.variants)]:
        for name, spec in stages.stage_specs(cfg):
            stages.stage_config(cfg, name, spec)


@pytest.mark.parametrize("where, value, match", [
    ("model.featurs", (4,), r"config.model \(model 'dou2017_fcn'\): unknown field\(s\) "
                            r"'featurs' \(did you mean 'features'\?\)"),
    ("task.los", "x", r"config.task \(task 'classification'\): unknown field\(s\) 'los'"),
    ("sampler.hard_fraction", 0.5, r"config.sampler: unknown field\(s\) 'hard_fraction'"),
    ("yu2021.epoch", 3, r"config.yu2021: unknown field\(s\) 'epoch' \(did you mean 'epochs'"),
    ("extra_section", {}, r"config: unknown field\(s\) 'extra_section'"),
    ("evals.patches.evry_steps", 3, r"config.evals.patches .*'evry_steps'"),
])
def test_undeclared_fields_fail_naming_the_key(where, value, match):
    c = load_config("configs/dou2017.py", "tiny")
    with c.unlocked():
        *parents, key = where.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[key] = value
    with pytest.raises(ConfigError, match=match):
        train.validate_config(c)


def test_a_stage_section_typo_fails_naming_the_stage():
    from lungjax import stages

    c = load_config("configs/dou2017.py", "tiny")
    name, spec = stages.stage_specs(c)[-1]
    spec["sections"].setdefault("train", {})["num_stepz"] = 3
    with pytest.raises(ConfigError, match=rf"stage '{name}': config.train: unknown field\(s\) "
                                          r"'num_stepz' \(did you mean 'num_steps'\?\)"):
        stages.stage_config(c, name, spec)


@pytest.mark.parametrize("field, value, match", [
    ("train.num_steps", -5, r"config.train.num_steps: -5 is not allowed; must be an "
                            r"integer >= 1"),
    ("train.batch_size", 0, r"config.train.batch_size: 0 is not allowed"),
    ("data.patch_size_zyx", (10, 0, 30), r"config.data.patch_size_zyx: \(10, 0, 30\)"),
    ("data.fold", 10, r"config.data.fold: 10 is not allowed; must be an integer in \[0, "
                      r"data.num_folds = 10\)"),
    ("data.hu_window", (400.0, -1000.0), r"config.data.hu_window"),
    ("screening.nodule_score", "max", r"config.screening.nodule_score: 'max' is not "
                                      r"allowed; must be peak \| mean \| volume"),
])
def test_impossible_values_fail_before_anything_runs(field, value, match):
    c = load_config("configs/dou2017.py", "tiny")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ConfigError, match=match):
        train.validate_config(c)


def test_a_patch_the_network_cannot_take_is_a_config_error():
    c = load_config("configs/dou2017.py", "tiny")
    c.data.patch_size_zyx = (7, 7, 7)
    with pytest.raises(ConfigError, match=r"config.data.patch_size_zyx: \(7, 7, 7\) cannot pass "
                                          r"through the network\(s\) of model 'dou2017_fcn'"):
        train.build_engine(c)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "error: --config: no such config file 'configs/nope.py'"),
    (["--config=configs/dou2017.py:tinyy"],
     "configs/dou2017.py: unknown variant 'tinyy' (default | tiny | paper)"),
    (["--config=configs/dou2017.py:tiny", "--config.train.nonexistent=1"],
     "error: --config.train.nonexistent: no such field"),
    (["--config=configs/dou2017.py:tiny", "--config.train.num_steps=-5"],
     "error: config.train.num_steps: -5 is not allowed; must be an integer >= 1"),
])
def test_command_line_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lungjax.main", *args,
                           f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_workdir_from_before_a_field_was_declared_is_not_a_change():
    """Records keep what a stage computed from; a field declared later at its default,
    or one no longer declared, does not make an old run directory a different config, a
    real change (or a removed model argument) does."""
    from lungjax import stages

    c = load_config("configs/dou2017.py", "tiny")
    name, spec = stages.stage_specs(c)[0]
    specs = dict(stages.stage_specs(c))
    new = json.loads(json.dumps(stages.computed_from(c, name, specs), default=str))
    old = json.loads(json.dumps(new))
    del old["config"]["data"]["max_nodules_per_patch"]  # declared after that run
    del old["spec"]["mirrors"]  # a stage field added after that run
    old["config"]["sampler"]["epochs_per_round"] = 4  # read by nothing any more
    assert stages.config_changes(old, new) == []
    changed = json.loads(json.dumps(new))
    changed["spec"]["mirrors"] = not new["spec"]["mirrors"]
    assert stages.config_changes(changed, new) == [
        f"spec.mirrors: {not new['spec']['mirrors']} -> {new['spec']['mirrors']}"]
    old["config"]["train"]["num_steps"] += 1
    old["config"]["model"]["dropout"] = 0.5
    assert stages.config_changes(old, new) == [
        "model.dropout: 0.5 -> '(unset)'",
        f"train.num_steps: {c.train.num_steps + 1} -> {c.train.num_steps}"]
