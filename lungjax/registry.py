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
        from lungjax.configcheck import as_dict

        d = as_dict(cfg)
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
MODELS = Registry("model", ("lungjax.models.fcn", "lungjax.models.fp_reduction",
                            "lungjax.models.resnet_fpn", "lungjax.models.shrey2020",
                            "lungjax.models.classifiers2d", "lungjax.models.sathish2020",
                            "lungjax.models.yu2021"))
TASKS = Registry("task", ("lungjax.tasks.classification", "lungjax.tasks.hybrid",
                          "lungjax.tasks.anchors", "lungjax.tasks.segmentation"))
# Losses are registered functions ``loss(logits, labels) -> (B,)`` used by tasks.
LOSSES = Registry("loss", ("lungjax.tasks.classification",))
EVALUATORS = Registry("evaluator", ("lungjax.train", "lungjax.evaluation.evaluators"))
TRANSFORMS = Registry("transform", ("lungjax.data.augment",))
# Train-step factories chosen by ``config.train.step``: ``factory(config, networks, task) ->
# [(network name, update)]`` (lungjax.steps); per-batch sample selection inside the train
# step: ``factory(**kwargs) -> filter`` with ``filter(losses, seed) -> (B,) float32 0/1
# mask`` (``losses`` (B,) float32 per-sample losses without gradient, ``seed`` () uint32).
STEPS = Registry("step", ("lungjax.steps", "lungjax.methods.sathish2020"))
SAMPLE_FILTERS = Registry("sample_filter", ("lungjax.steps",))
# A method is stages (lungjax.stages): stage kinds by ``config.stages.<s>.kind``
# (``run(StageRun) -> record``), their exports, and fields a method computes for one of its
# stages from its config (``config.stages.<s>.derive``: ``fn(stage_config, config)``).
STAGES = Registry("stage", ("lungjax.stages", "lungjax.methods.candidates",
                            "lungjax.methods.shrey2020", "lungjax.methods.yu2021",
                            "lungjax.methods.sathish2020"))
STAGE_EXPORTS = Registry("stage export", ("lungjax.stages", "lungjax.methods.candidates",
                                          "lungjax.methods.sathish2020",
                                          "lungjax.methods.shrey2020", "lungjax.methods.yu2021"))
STAGE_CONFIGS = Registry("stage config", ("lungjax.methods.dou2017", "lungjax.methods.yu2021"))
# Training-data sources chosen by ``config.sampler.name`` ("balanced" = the plain
# ``lungjax.data.pipeline.StoreTrainData``), whole-scan detectors chosen by
# ``config.detection.detector`` for "detect" stages, and a method's own cross-validation
# report chosen by ``config.cv.report``.
SAMPLERS = Registry("sampler", ("lungjax.methods.xie2018", "lungjax.data.dense_sampling",
                                "lungjax.methods.yu2021"))
DETECTORS = Registry("detector", ("lungjax.stages", "lungjax.methods.xie2018"))
# A detector's "detect" stage export and its loader for ``python -m lungjax.detect``:
# ``export(StageRun) -> sidecar``, ``load(export_dir) -> find(volume, geometry, lung) ->
# (world_xyz, score, diameter_mm)``; keyed like DETECTORS ("score_volume" is built in).
EXPORTED_DETECTORS = Registry("exported detector", ("lungjax.methods.xie2018",))
# A method whose final exported stage is its own kind (not "detect" or
# "classify_candidates"), keyed by that kind: ``load(stage_dir) -> find(volume, geometry,
# lung) -> (world_xyz, score, diameter_mm or None, {name: (D, H, W) mask of the
# volume})``; the predict command writes each mask on the scan's own grid.
EXPORTED_METHODS = Registry("exported method", ("lungjax.methods.sathish2020",
                                                 "lungjax.methods.shrey2020",
                                                 "lungjax.methods.yu2021"))
CV_REPORTS = Registry("cv_report", ("lungjax.methods.dou2017", "lungjax.methods.xie2018",
                                    "lungjax.methods.shrey2020", "lungjax.methods.yu2021",
                                    "lungjax.methods.sathish2020"))
