"""Name -> constructor registries, so configs choose components by name.

Code branches on registered names (``config.model.name``), never on file names.
Each registry maps a snake_case key to a callable; modules register themselves at
import time with the decorator form::

    @MODELS.register("dou2017_fcn")
    class Dou2017FCN(nn.Module): ...

and the engine builds them with ``MODELS.build(config.model)`` (``name`` picks the
entry, every other field becomes a keyword argument).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


class Registry:
    """A named table of constructors.

    Args:
      kind: what the entries are ("model", "task", ...); used in error messages.
      modules: modules imported on first lookup so their entries register
        themselves (keeps ``import lungjax.registry`` cheap and cycle-free).
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def register(self, name: str, fn: Callable[..., Any] | None = None):
        """Registers ``fn`` under ``name``; usable as a decorator."""

        def _add(f):
            if name in self._entries and self._entries[name] is not f:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = f
            return f

        return _add(fn) if fn is not None else _add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                try:
                    importlib.import_module(m)
                except ModuleNotFoundError as e:
                    # A module that does not exist yet (a method not built) only hides its
                    # own entries; a module that exists but fails to import is a real error.
                    if not (e.name == m or m.startswith(f"{e.name}.")):
                        raise

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def build(self, cfg: Mapping[str, Any] | Any, **extra) -> Any:
        """Calls the entry ``cfg["name"]`` with the other fields of ``cfg`` plus ``extra``."""
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        name = d.pop("name", None)
        if not name:
            raise ValueError(f"{self.kind} config has no 'name' field: {d}")
        d.update(extra)
        return self.get(name)(**d)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


# Modules whose entries register on import; a listed module that does not exist (a method
# not built in this checkout) just contributes nothing.
MODELS = Registry("model", ("lungjax.models.fcn", "lungjax.models.fpr", "lungjax.models.fpn"))
TASKS = Registry("task", ("lungjax.tasks.classification", "lungjax.tasks.hybrid",
                          "lungjax.tasks.anchors"))
# Losses are registered functions ``loss(logits, labels) -> (B,)`` used by tasks.
LOSSES = Registry("loss", ("lungjax.tasks.classification",))
EVALUATORS = Registry("evaluator", ("lungjax.train",))
TRANSFORMS = Registry("transform", ("lungjax.data.augment",))
# Multi-stage methods chosen by ``config.method``: ``run(mode, config, workdir)`` replaces
# the single-network modes of ``lungjax.modes`` (e.g. dou2017: screening FCN + FP reduction).
METHODS = Registry("method", ("lungjax.methods.dou2017",))
# Training-data sources chosen by ``config.sampler.name`` ("balanced" = the plain
# ``lungjax.data.pipeline.StoreTrainData``), whole-scan detectors chosen by
# ``config.task.name`` (tasks without a ``layer_specs`` screening network), and extra
# cross-validation reports chosen by ``config.cv.report``.
SAMPLERS = Registry("sampler", ("lungjax.methods.xie2018",))
DETECTORS = Registry("detector", ("lungjax.methods.xie2018",))
CV_REPORTS = Registry("cv_report", ("lungjax.methods.xie2018",))
