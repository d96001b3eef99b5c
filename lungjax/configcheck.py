"""The config contract: every field a run reads is declared, and a misspelt one fails by name.

Declared means one of:

* a field of ``lungjax.config_schema.get_config()`` (every generic section, every
  sampler field, the method sections such as ``yu2021``);
* in an *open* section, a constructor argument of the registered class that the section
  names: ``model`` (and ``networks.<n>.model``) -> the ``MODELS`` entry's dataclass
  fields, ``task`` -> the ``TASKS`` entry's ``__init__`` arguments, ``evals.<n>`` -> the
  ``EVALUATORS`` entry's arguments plus ``type`` / ``every_steps``;
* ``stages`` / ``cv.variants`` entries, whose fields ``lungjax.stages`` checks itself.

:func:`check_declared` runs on the method's config before anything is written and on each
stage's config (a stage's ``sections`` can change its model or task), so a typo in a
method file, a stage section or a ``--config.`` override stops the run in one line
naming the key and what is allowed. :func:`as_dict` is the one ConfigDict -> dict
converter.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Mapping, TypeVar

from ml_collections.config_dict import RequiredValueError

T = TypeVar("T")

# Sections whose keys are the arguments of the registered class they name (or, for
# stages and cv variants, checked by lungjax.stages); every other section is declared
# field by field in the schema.
OPEN_SECTIONS = ("model", "task", "networks", "evals", "stages", "cv.variants")
_NETWORK_FIELDS = ("input_channels", "model", "optimizer")
_EVAL_FIELDS = ("type", "every_steps")


class ConfigError(ValueError):
    """An invalid configuration field; the message names it and what is allowed."""


_LEAVE_OUT = object()


def as_dict(d: Any, unset: Any = _LEAVE_OUT) -> Any:
    """``ConfigDict`` / mapping -> plain dicts, recursively (tuples and lists keep their
    type, their items converted). Unset required placeholders are left out, so a section
    can be read before every field is chosen (reading one from the config raises), or, with
    ``unset``, kept with that value."""
    if isinstance(d, Mapping) or hasattr(d, "to_dict"):
        out = {}
        for k in list(d.keys()):
            try:
                v = d[k]
            except RequiredValueError:
                if unset is not _LEAVE_OUT:
                    out[k] = unset
                continue
            out[k] = as_dict(v, unset)
        return out
    if isinstance(d, (tuple, list)):
        return type(d)(as_dict(v, unset) for v in d)
    return d


def dataclass_from_mapping(cls: type[T], d: Mapping[str, Any] | None, section: str) -> T:
    """``cls(**d)`` after checking that every key of ``d`` is a field of ``cls``.

    Args:
      cls: a dataclass type.
      d: its field values (dict or ConfigDict); None = every field at its default.
      section: the config section's dotted name, used in the error (e.g. "augment.positive").

    Raises:
      ConfigError: naming ``section``, the unknown keys and the known fields.
    """
    if d is None:
        return cls()
    d = as_dict(d)
    _unknown(d, {f.name for f in dataclasses.fields(cls)}, section)
    return cls(**d)


def _unknown(d: Mapping[str, Any], known, where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(known), n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}: unknown field(s) {', '.join(hints)}; known: "
                      f"{', '.join(sorted(known))}")


def arguments(entry: Any) -> set[str] | None:
    """The keyword arguments a registered entry takes (None: it takes any)."""
    if dataclasses.is_dataclass(entry):
        return {f.name for f in dataclasses.fields(entry) if f.name not in ("parent", "name")}
    params = inspect.signature(entry).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self"}


def _check_entry(d: Mapping[str, Any], registry, key: str, fixed, where: str) -> None:
    """``d[key]`` names an entry of ``registry``; the other keys must be its arguments."""
    name = d.get(key)
    if name is None:
        return  # required placeholder left unset: train.validate_config names it
    if name not in registry:
        raise ConfigError(f"{where}.{key}: {name!r} is not a {registry.kind} "
                          f"({', '.join(registry.names())})")
    args = arguments(registry.get(name))
    if args is not None:
        _unknown(d, set(args) | set(fixed), f"{where} ({registry.kind} {name!r})")


def check_declared(config, where: str = "config") -> None:
    """Raises :class:`ConfigError` naming the first field of ``config`` that nothing
    declares (module docstring), with the close match and the known fields."""
    from lungjax import config_schema
    from lungjax.registry import EVALUATORS, MODELS, TASKS

    schema = as_dict(config_schema.get_config(), unset=None)  # placeholders are declared
    cfg = as_dict(config)
    _walk(cfg, schema, where, "")
    if "model" in cfg:
        _check_entry(cfg["model"], MODELS, "name", ("name",), f"{where}.model")
    if "task" in cfg:
        _check_entry(cfg["task"], TASKS, "name", ("name",), f"{where}.task")
    for n, net in cfg.get("networks", {}).items():
        w = f"{where}.networks.{n}"
        if not isinstance(net, Mapping):
            raise ConfigError(f"{w}: a dict of {', '.join(_NETWORK_FIELDS)}, got {net!r}")
        _unknown(net, _NETWORK_FIELDS, w)
        if "model" in net:
            _check_entry(net["model"], MODELS, "name", ("name",), f"{w}.model")
        _unknown(net.get("optimizer", {}), schema["optimizer"], f"{w}.optimizer")
    for n, ev in cfg.get("evals", {}).items():
        w = f"{where}.evals.{n}"
        if not isinstance(ev, Mapping) or "type" not in ev:
            raise ConfigError(f"{w}: a dict with 'type' (an evaluator: "
                              f"{', '.join(EVALUATORS.names())}), got {ev!r}")
        _check_entry(ev, EVALUATORS, "type", _EVAL_FIELDS, w)


def _walk(cfg: Mapping[str, Any], schema: Mapping[str, Any], where: str, path: str) -> None:
    _unknown(cfg, schema, f"{where}{'.' + path[:-1] if path else ''}")
    for k, v in cfg.items():
        p = f"{path}{k}"
        if p in OPEN_SECTIONS:
            continue
        if isinstance(schema.get(k), Mapping) and schema[k]:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}.{p}: a section, got {v!r}")
            _walk(v, schema[k], where, f"{p}.")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _rules(c: Mapping[str, Any]) -> list[tuple[str, Any, bool, str]]:
    """(field, value, holds, what is allowed) for the values a run cannot start without."""
    from lungjax.tasks.screening import NODULE_SCORES

    d, t, o = c["data"], c["train"], c["optimizer"]
    size = tuple(d.get("patch_size_zyx") or ())
    spacing = tuple(d["spacing_zyx"])
    window = tuple(d["hu_window"])
    folds = tuple(c["cv"]["folds"])
    return [
        ("train.num_steps", t.get("num_steps"), _positive_int(t.get("num_steps")),
         "an integer >= 1"),
        ("train.batch_size", t.get("batch_size"), _positive_int(t.get("batch_size")),
         "an integer >= 1"),
        ("train.log_every", t["log_every"], _positive_int(t["log_every"]), "an integer >= 1"),
        ("train.checkpoint_every", t["checkpoint_every"], _positive_int(t["checkpoint_every"]),
         "an integer >= 1"),
        ("train.keep_checkpoints", t["keep_checkpoints"], _positive_int(t["keep_checkpoints"]),
         "an integer >= 1"),
        ("optimizer.learning_rate", o.get("learning_rate"),
         isinstance(o.get("learning_rate"), (int, float)) and o.get("learning_rate", 0) > 0,
         "a number > 0"),
        ("data.patch_size_zyx", size,
         all(_positive_int(s) for s in size) and (
             len(size) == 3 if d["spatial_dims"] == 3 else
             len(size) == 2 or (len(size) == 3 and size[0] == 1)),
         "integers >= 1: (z, y, x) with data.spatial_dims = 3, (y, x) or (1, y, x) with 2"),
        ("data.spacing_zyx", spacing, len(spacing) == 3 and all(s > 0 for s in spacing),
         "three numbers > 0 (mm)"),
        ("data.hu_window", window, len(window) == 2 and window[0] < window[1],
         "(low, high) HU with low < high"),
        ("data.num_folds", d["num_folds"], _positive_int(d["num_folds"]), "an integer >= 1"),
        ("data.fold", d["fold"],
         isinstance(d["fold"], int) and 0 <= d["fold"] < max(1, d["num_folds"]),
         f"an integer in [0, data.num_folds = {d['num_folds']})"),
        ("data.positive_fraction", d["positive_fraction"],
         0.0 <= float(d["positive_fraction"]) <= 1.0, "a number in [0, 1]"),
        ("data.spatial_dims", d["spatial_dims"], d["spatial_dims"] in (2, 3), "2 or 3"),
        ("cv.folds", folds,
         all(isinstance(f, int) and 0 <= f < max(1, d["num_folds"]) for f in folds),
         f"folds in [0, data.num_folds = {d['num_folds']})"),
    ] + [(f"{section}.nodule_score", c[section]["nodule_score"],
          c[section]["nodule_score"] in NODULE_SCORES, " | ".join(NODULE_SCORES))
         for section in ("screening", "yu2021")]


def check_values(config, where: str = "config") -> None:
    """Raises :class:`ConfigError` for the first impossible value (non-positive steps,
    batch or sizes, a fold outside the folds, ...), naming the field, the value and what is
    allowed. Unset required fields are left to ``train.validate_config``'s message."""
    c = as_dict(config)
    for field, value, holds, allowed in _rules(c):
        if value is None or value == ():
            continue  # unset required placeholder
        if not holds:
            raise ConfigError(f"{where}.{field}: {value!r} is not allowed; must be {allowed}")
