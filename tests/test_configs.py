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

from lungjax import train

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
    cfg = config_dict.ConfigDict({"runtime": {"keep_freed_memory": False}})
    cli._configure_malloc(cfg)
    assert calls == []  # off by default: it raises peak memory (configs/base.py)
    cfg.runtime.keep_freed_memory = True
    monkeypatch.setattr(cli, "_runs_on_cpu", lambda: True)
    cli._configure_malloc(cfg)
    assert calls == [1]
    monkeypatch.setattr(cli, "_runs_on_cpu", lambda: False)
    cli._configure_malloc(cfg)
    assert calls == [1]  # not on an accelerator
