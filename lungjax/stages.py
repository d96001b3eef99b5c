"""The runner: a method is an ordered list of stages in its config; one runner runs them all.

A stage is one step of a method (nnU-Net's fingerprint -> plan -> train -> predict ->
evaluate, in miniature): train a network, screen whole scans for candidates, score the
candidates with a second network, detect nodules. ``config.stages`` holds them by name,
each a dict of the fields in :data:`STAGE_FIELDS`, and ``config.stage_order`` their order; ``kind`` picks the function in
``lungjax.registry.STAGES`` that runs it. What a stage takes from earlier stages is named
in its fields (``init_from``: parameters; ``network``: the trained network it applies;
``candidates_from`` / ``hard_negatives_from``: candidates of a screening stage). A stage's
run configuration is the method's config with the stage's ``sections`` merged over it
(``replace`` lists sections replaced outright instead of merged field by field).

On disk, one fold (``data.fold`` held out) is::

    <fold_dir>/<stage>/            one folder per stage: checkpoints, metrics, outputs
    <fold_dir>/<stage>/stage.json  the stage's record, written last: its "done" marker
    <fold_dir>/<variant>/<stage>/  cross-validation variants (``cv.variants``), for the
                                   stages where they differ from the method
    <fold_dir>/fold.json           the fold's record: every stage's record, the final
                                   stage's evaluation

A rerun skips a stage whose record exists and resumes an unfinished training from its
checkpoint; ``--mode=evaluate`` reruns every stage that applies a trained network (its
``network`` field is set: screening, scoring, detection) with the trained networks. ``--mode=cv`` runs every fold of
``cv.folds`` in ``<workdir>/fold_<k>``, each variant of ``cv.variants`` beside the method
(a variant's stage whose configuration equals the method's is not run twice: it is the
method's), then one report in ``<workdir>/cv`` and, when ``cv.report`` names one, the
method's own report (``lungjax.registry.CV_REPORTS``). ``--mode=export`` writes every
stage that applies a network and has an export (``lungjax.registry.STAGE_EXPORTS``) to
``<workdir>/export/<stage>`` and the stage list to
``<workdir>/export/method.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from lungjax import fileio
from lungjax import train as train_lib
from lungjax.atomic import atomic_write_json
from lungjax.configcheck import OPEN_SECTIONS, as_dict
from lungjax.cv_launch import CV_STEPS
from lungjax.metrics_log import banner
from lungjax.registry import CV_REPORTS, DETECTORS, STAGE_EXPORTS, STAGES
from lungjax.runlock import run_folder_lock

STAGE_RECORD = "stage.json"
STAGE_CONFIG = "stage_config.json"  # what the stage computes from, written when it starts
FOLD_RECORD = "fold.json"
METHOD_JSON = "method.json"

# Every field a stage may set, with its default. A key not listed here is an error that
# names it (a misspelt ``init_from`` would otherwise silently train from scratch).
STAGE_FIELDS: dict[str, Any] = {
    "kind": "",  # a lungjax.registry.STAGES key: "train", "detect", "screen", ...
    "sections": {},  # run-config sections merged over the method's config for this stage
    "replace": (),  # names in ``sections`` that replace the method's section outright
    "derive": "",  # a lungjax.registry.STAGE_CONFIGS key: fields computed from the config
    "network": "",  # the earlier "train" stage whose network this stage applies
    "init_from": "",  # "train": the earlier "train" stage whose parameters seed this one
    "init_paths": (),  # "train": "src/path:dst/path" module paths copied from init_from
    "hard_negatives_from": "",  # "train": a "screen" stage; its training-scan candidates
    #                             become hard negatives of this stage's sampler
    "candidates_from": "",  # the "screen" stage whose held-out candidates this stage scores
    "segmenter_from": "",  # a "train" stage whose segmentation network gives the region
    #                        this stage looks in (sathish2020: the lungs its patches lie in)
    "train_scans": 0,  # "screen": training scans screened for hard negatives (0 = all)
    "batch": 32,  # candidate patches per network call
    "regressed_position": False,  # "classify_candidates": marks at the regressed centre
    "mirrors": False,  # "classify_candidates": outputs averaged over the patch's 8 mirror
    #                    images (lungjax.methods.candidates.mirror_averaged)
    "mirror_top": 0,  # with mirrors: only the best this many candidates of a scan by one
    #                   view get all eight (score_candidates); 0 = every candidate
    "merge_within_diameter": False,  # "classify_candidates": a mark inside the regressed
    #                                  diameter of a higher-scoring one on its scan joins it
    #                                  (lungjax.methods.candidates.merge_within_diameter)
    "evaluator": "",  # "froc": the stage's marks scored with the LUNA16 FROC
    "progress": True,  # progress bars over scans
}
# Run-config fields that do not change what a stage computes (the other stages, the
# cross-validation plan, the run's name).
NOT_COMPUTED = ("name", "stages", "stage_order", "cv")
# Fields a rerun may change on a finished or interrupted stage: how often it logs and
# saves, how its data is read, what is shown; everything else changes its results.
NO_EFFECT = ("config.train.log_every", "config.train.checkpoint_every",
             "config.train.keep_checkpoints", "config.train.async_checkpoint",
             "config.train.progress_bar", "config.data.workers", "config.data.prefetch_buffer",
             "config.data.prepare_workers", "config.data.read_threads",
             "config.data.prefetch_batches", "config.runtime.", "config.export.",
             "spec.progress", "spec.batch")


# Spec fields that name an earlier stage (what a stage takes from; in its fingerprint).
REFERENCES = ("network", "init_from", "hard_negatives_from", "candidates_from",
              "segmenter_from")


class StageError(ValueError):
    """A method's stage list is inconsistent (names the stage and the field)."""


# ----------------------------------------------------------------------------------
# Stage specs and configs
# ----------------------------------------------------------------------------------


def stage_specs(config) -> list[tuple[str, dict]]:
    """``config.stages`` as ``[(name, spec)]`` in order, every field filled in.

    Raises:
      StageError: no stages, an unknown field or kind, or a reference to a stage that is
        not earlier in the list.
    """
    stages = as_dict(config.stages)
    if not stages:
        raise StageError("config.stages: empty; a method lists its stages (see "
                         "lungjax/stages.py)")
    order = list(config.stage_order) or (list(stages) if len(stages) == 1 else [])
    if sorted(order) != sorted(stages):
        raise StageError(f"config.stage_order: {tuple(order)} must list every stage of "
                         f"config.stages once ({', '.join(sorted(stages))})")
    out: list[tuple[str, dict]] = []
    for name in order:
        raw = stages[name]
        unknown = sorted(set(raw) - set(STAGE_FIELDS))
        if unknown:
            raise StageError(f"config.stages.{name}: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(STAGE_FIELDS)})")
        spec = {**as_dict(STAGE_FIELDS), **raw}
        if spec["kind"] not in STAGES:
            raise StageError(f"config.stages.{name}.kind: {spec['kind']!r} is not a stage "
                             f"kind ({', '.join(STAGES.names())})")
        earlier = {n: s for n, s in out}
        for field in REFERENCES:
            ref = spec[field]
            if ref and ref not in earlier:
                raise StageError(f"config.stages.{name}.{field}: {ref!r} is not an earlier "
                                 f"stage ({', '.join(earlier) or 'none'})")
            # Networks come from "train" stages; candidates from any stage that leaves
            # candidates_*.npz (a "screen" stage, or a method's own kind).
            if ref and field in ("network", "init_from", "segmenter_from") \
                    and earlier[ref]["kind"] != "train":
                raise StageError(f"config.stages.{name}.{field}: stage {ref!r} is a "
                                 f"{earlier[ref]['kind']!r} stage, not a 'train' stage")
        unknown = sorted(set(spec["replace"]) - set(spec["sections"]))
        if unknown:
            raise StageError(f"config.stages.{name}.replace: {', '.join(unknown)} not in "
                             "its sections")
        out.append((name, spec))
    return out


def _merge(dst: ConfigDict, src: Mapping[str, Any]) -> None:
    """Merges ``src`` into ``dst`` field by field (nested sections recursively)."""
    for k, v in src.items():
        if isinstance(v, Mapping) and k in dst and isinstance(dst[k], ConfigDict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def stage_config(config, name: str, spec: Mapping[str, Any]):
    """The run configuration of stage ``name``: ``config`` with the stage's sections.

    A stage that applies another stage's network (``network``) starts from that stage's
    configuration (its model, task and data are what the network was trained with).
    """
    specs = dict(stage_specs(config))
    if spec["network"]:
        cfg = stage_config(config, spec["network"], specs[spec["network"]])
    else:
        cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        for section, value in spec["sections"].items():
            where = f"config.stages.{name}.sections.{section}"
            if section not in cfg:
                raise StageError(f"{where}: not a field of the run config")
            if section in spec["replace"]:
                cfg[section] = ConfigDict(value)
            elif isinstance(cfg[section], ConfigDict):
                _merge(cfg[section], value)
            else:
                cfg[section] = value
        if spec["derive"]:
            from lungjax.registry import STAGE_CONFIGS

            STAGE_CONFIGS.get(spec["derive"])(cfg, config)
        if spec["kind"] == "train":
            cfg.name = f"{config.name}_{name}"
    # The stage's sections may name another model or task: their fields are checked here.
    train_lib.validate_config(cfg, where=f"stage {name!r}: config")
    return cfg


def computed_from(config, name: str, specs: Mapping[str, dict]) -> dict:
    """What stage ``name`` computes from: its spec and its run config (JSON-able)."""
    spec = specs[name]
    parts = {"spec": spec, "config": as_dict(stage_config(config, name, spec))}
    for key in NOT_COMPUTED:
        parts["config"].pop(key, None)
    return parts


def fingerprint(config, name: str, specs: Mapping[str, dict]) -> str:
    """Hash of what stage ``name`` computes: its spec, its run config and, recursively,
    the stages it takes from. Equal fingerprints = the same results."""
    spec = specs[name]
    parts = computed_from(config, name, specs)
    for field in REFERENCES:
        if spec[field]:
            parts[field] = fingerprint(config, spec[field], specs)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _declared_defaults() -> dict[str, Any]:
    """``config.<field>`` -> default of every field the schema declares (JSON values)."""
    from lungjax.config_schema import get_config

    return _flat({"config": json.loads(json.dumps(as_dict(get_config()), default=str))})


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields of :func:`computed_from` records that differ and change a stage's results
    (not :data:`NO_EFFECT`), as ``"field: old -> new"``, sorted."""
    a, b = _flat(json.loads(json.dumps(old, default=str))), \
        _flat(json.loads(json.dumps(new, default=str)))
    # The spec's sections / replace / derive act through the run config, compared already.
    skip = NO_EFFECT + ("spec.sections", "spec.replace", "spec.derive")
    declared = _declared_defaults()
    # Schema sections declared field by field (not the model / task / ... arguments).
    closed = {k.split(".")[1] for k in declared} - set(OPEN_SECTIONS)
    # Stage fields added to STAGE_FIELDS after the run, at their defaults, likewise.
    declared.update(_flat({"spec": json.loads(json.dumps(STAGE_FIELDS, default=str))}))
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == n or key.startswith(n) for n in skip):
            continue
        if key not in a and key in declared and b[key] == declared[key]:
            continue  # declared after the run, at its default: what the run computed with
        if key not in b and key not in declared and key.split(".")[1] in closed:
            continue  # no longer declared in a section declared field by field: unread
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            out.append(f"{key.removeprefix('config.')}: {a.get(key, '(unset)')!r} -> "
                       f"{b.get(key, '(unset)')!r}")
    return out


class StageConfigError(ValueError):
    """A rerun asks a stage folder for results of another configuration."""


def _check_or_restart(d: str, name: str, computed: dict, restart: bool) -> bool:
    """Compares a stage folder's recorded configuration with ``computed``; returns True
    when the folder was moved aside (``restart``), raises :class:`StageConfigError`
    naming the changed fields when it differs and ``restart`` is off."""
    old = read_json(os.path.join(d, STAGE_CONFIG))
    if old is None or not _has_results(d):
        return False
    changes = config_changes(old, computed)
    if not changes:
        return False
    if not restart:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more"
                                           if len(changes) > 6 else "")
        raise StageConfigError(
            f"{d}: stage {name!r} was run with another configuration ({shown}); rerun with "
            "--restart to start it over (the old folder is kept beside it) or use another "
            "--workdir")
    return True


def _has_results(d: str) -> bool:
    """Whether stage folder ``d`` holds anything computed besides its recorded config (a
    stage that failed before computing anything, e.g. on a bad patch size, does not)."""
    for n in fileio.listdir(d):
        p = os.path.join(d, n)
        if n == STAGE_CONFIG or (fileio.isdir(p) and not fileio.listdir(p)):
            continue
        if n == "checkpoints" and not any(c.isdigit() for c in fileio.listdir(p)):
            continue
        return True
    return False


def _move_aside(d: str) -> str:
    aside = f"{d}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        fileio.move(d, aside)
    print(f"--restart: {d} moved to {aside}", flush=True)
    return aside


# ----------------------------------------------------------------------------------
# One fold
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class FoldContext:
    """What every stage of one fold shares.

    Attributes:
      config: the method's config (``data.fold`` = the held-out fold).
      fold_dir: the fold's run directory.
      store: the prepared ``PatchStore``.
      train_uids: scans of the training folds, store order.
      test_uids: held-out scans scored (``detection.max_scans`` caps them).
      evaluate_only: no training; stages that apply networks run again.
      engines: compiled engines reused across folds, keyed by the stage config without
        its fold.
    """

    config: Any
    fold_dir: str
    store: Any
    train_uids: list[str]
    test_uids: list[str]
    evaluate_only: bool = False
    engines: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageRun:
    """One stage about to run: its name, spec, run config, folder, and what the earlier
    stages of the fold left (``dirs`` / ``records`` / ``configs`` by stage name)."""

    name: str
    spec: dict
    config: Any
    dir: str
    ctx: FoldContext
    dirs: dict[str, str]
    records: dict[str, dict]
    configs: dict[str, Any]
    needs_train_candidates: bool = False

    @property
    def progress(self) -> bool:
        return bool(self.spec["progress"]) and jax.process_index() == 0


def read_json(path: str) -> dict | None:
    if not fileio.isfile(path):
        return None
    with fileio.open_file(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        atomic_write_json(path, obj)


def fold_context(config, fold_dir: str, evaluate_only: bool = False,
                 engines: dict | None = None) -> FoldContext:
    from lungjax.data.store import PatchStore
    from lungjax.train_data import held_out_uids, prepare_data

    store = PatchStore.open(prepare_data(config))
    test_uids = held_out_uids(config, store)
    held = set(test_uids)
    train_uids = [u for u in store.uids() if u not in held]
    if not train_uids:
        raise ValueError(f"no training scans: every scan is in fold {config.data.fold}")
    if config.detection.max_scans:
        test_uids = test_uids[:config.detection.max_scans]
    return FoldContext(config, fold_dir, store, train_uids, test_uids, evaluate_only,
                       {} if engines is None else engines)


def run_stages(ctx: FoldContext, config, base_dir: str, *, until: str = "",
               shared: Mapping[str, tuple[str, dict]] | None = None,
               restart: bool = False) -> dict[str, Any]:
    """Runs the stages of ``config`` for one fold, in order.

    Args:
      ctx: the fold's shared context.
      config: the method (or variant) config.
      base_dir: stage folders go to ``<base_dir>/<stage>``.
      until: last stage to run ("" = all).
      shared: fingerprint -> (folder, record) of stages already run (a variant reuses
        the method's stages that compute the same thing).
      restart: a stage folder whose recorded configuration differs in a field that
        changes results is moved aside and the stage, with every later one, run again;
        without it that is a :class:`StageConfigError` naming the fields.

    Returns:
      ``{"dirs", "records", "fingerprints"}`` keyed by stage name.
    """
    specs = stage_specs(config)
    by_name = dict(specs)
    if until and until not in by_name:
        raise StageError(f"until={until!r}: no such stage ({', '.join(by_name)})")
    if until:
        specs = specs[:[n for n, _ in specs].index(until) + 1]
    # Every stage's config is built (and checked: train.validate_config) before the
    # first stage runs, so a bad field in a late stage costs no training.
    fps = {name: fingerprint(config, name, by_name) for name, _ in specs}
    configs = {name: stage_config(config, name, spec) for name, spec in specs}
    dirs, records = {}, {}
    restarted = False  # a restarted stage invalidates every later one
    for i, (name, spec) in enumerate(specs):
        fp = fps[name]
        later = specs[i + 1:]
        if shared and fp in shared:
            dirs[name], records[name] = shared[fp]
        else:
            d = os.path.join(base_dir, name)
            path = os.path.join(d, STAGE_RECORD)
            computed = computed_from(config, name, by_name)
            if fileio.isdir(d) and (restarted or _check_or_restart(d, name, computed,
                                                                    restart)):
                _move_aside(d)
                restarted = True
            rec = read_json(path)
            # A stage that applies a trained network (``network`` set) is what
            # --mode=evaluate reruns.
            rerun = ctx.evaluate_only and bool(spec["network"])
            if rec is not None and not rerun:
                banner(f"{name}: done ({path})")
            else:
                if spec["kind"] == "train" and ctx.evaluate_only:
                    raise FileNotFoundError(f"{d}: stage {name!r} is not trained; run "
                                            "--mode=train first")
                run = StageRun(name, spec, configs[name], d, ctx, dirs, records, configs,
                               needs_train_candidates=any(
                                   s["hard_negatives_from"] == name for _, s in later))
                fileio.makedirs(d)
                write_json(os.path.join(d, STAGE_CONFIG), computed)
                banner(f"stage {name} ({spec['kind']}): fold {ctx.config.data.fold}")
                rec = STAGES.get(spec["kind"])(run)
                write_json(path, rec)
            dirs[name], records[name] = d, rec
    return {"dirs": dirs, "records": records, "fingerprints": fps}


def fold_config(config, fold: int):
    """A copy of ``config`` with fold ``fold`` held out (the method's config is never
    edited)."""
    cfg = config.copy_and_resolve_references()
    cfg.data.fold = int(fold)
    return cfg


def final_stage(config) -> str:
    """The stage whose evaluation is the method's result: the last with an evaluator,
    else the last stage."""
    specs = stage_specs(config)
    scored = [n for n, s in specs if s["evaluator"]]
    return scored[-1] if scored else specs[-1][0]


def variant_config(config, name: str):
    """The config of cross-validation variant ``name`` (``cv.variants.<name>``):
    ``stages`` fields merged over the method's stages, ``name`` suffixed."""
    v = as_dict(config.cv.variants[name])
    unknown = sorted(set(v) - {"stages", "until"})
    if unknown:
        raise StageError(f"config.cv.variants.{name}: unknown field(s) {', '.join(unknown)} "
                         "(stages | until)")
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        for stage, fields in v.get("stages", {}).items():
            if stage not in cfg.stages:
                raise StageError(f"config.cv.variants.{name}.stages.{stage}: no such stage")
            _merge_stage(cfg.stages[stage], fields, f"config.cv.variants.{name}.stages.{stage}")
        cfg.name = f"{config.name}_{name}"
    return cfg


def _merge_stage(dst: ConfigDict, src: Mapping[str, Any], where: str) -> None:
    for k, v in src.items():
        if k not in STAGE_FIELDS:
            raise StageError(f"{where}.{k}: not a stage field")
        if isinstance(v, Mapping) and k in dst and isinstance(dst[k], ConfigDict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def run_fold(config, fold_dir: str, *, variants: bool = False, evaluate_only: bool = False,
             engines: dict | None = None, restart: bool = False) -> dict:
    """The method on one fold (``config.data.fold`` held out); returns the fold record
    (also ``<fold_dir>/fold.json``). The fold's folder is held for the run
    (:func:`lungjax.runlock.run_folder_lock`): a second run on it stops at once."""
    with run_folder_lock(fold_dir, process_index=jax.process_index(),
                         process_count=jax.process_count()):
        return _run_fold(config, fold_dir, variants=variants, evaluate_only=evaluate_only,
                         engines=engines, restart=restart)


def _run_fold(config, fold_dir: str, *, variants: bool, evaluate_only: bool,
              engines: dict | None, restart: bool) -> dict:
    t0 = time.perf_counter()
    ctx = fold_context(config, fold_dir, evaluate_only, engines)
    for vname in config.cv.variants if variants else ():  # checked before anything runs
        vcfg = variant_config(config, vname)
        vspecs = dict(stage_specs(vcfg))
        for n, spec in vspecs.items():
            stage_config(vcfg, n, spec)
    main = run_stages(ctx, config, fold_dir, restart=restart)
    final = final_stage(config)
    record: dict[str, Any] = {"fold": int(config.data.fold), "uids": list(ctx.test_uids),
                              "final_stage": final,
                              "stage_order": [n for n, _ in stage_specs(config)],
                              "stages": main["records"],
                              "dirs": main["dirs"], "variants": {}}
    if variants:
        shared = {fp: (main["dirs"][n], main["records"][n])
                  for n, fp in main["fingerprints"].items()}
        for vname in config.cv.variants:
            vcfg = variant_config(config, vname)
            until = str(as_dict(config.cv.variants[vname]).get("until", ""))
            out = run_stages(ctx, vcfg, os.path.join(fold_dir, vname), until=until,
                             shared=shared, restart=restart)
            record["variants"][vname] = {"stages": out["records"], "dirs": out["dirs"]}
    record["result"] = main["records"][final]
    record["wall_seconds"] = time.perf_counter() - t0
    write_json(os.path.join(fold_dir, FOLD_RECORD), record)
    return record


def print_fold(record: dict, fold_dir: str) -> None:
    """The fold's figures on the console, final stage last."""
    lines = [f"fold {record['fold']}: {len(record['uids'])} held-out scans"]
    for name in record["stage_order"]:
        line = record["stages"][name].get("summary_line")
        if line:
            lines.append(f"  {name}: {line}")
    res = record["result"]
    if "cpm" in res:
        lo, hi = res["cpm_ci95"]
        lines += [f"CPM (FROC[luna]) = {res['cpm']:.4f} (95% CI {lo:.3f}-{hi:.3f}, bootstrap "
                  f"over scans), FROC[new] = {res['froc_new']:.4f}; {res['n_detected']}/"
                  f"{res['n_nodules']} nodules hit; {res['marks']} marks; "
                  f"{res['mean_seconds_per_scan']:.1f} s/scan"
                  + (f"; CPM {res['cpm_unmerged']:.4f} before merging marks within the "
                     "regressed diameter" if "cpm_unmerged" in res else ""),
                  "sensitivity at FPs/scan " + ", ".join(
                      f"{r:g}: {s:.3f}" for r, s in zip(res["fp_rates"], res["sensitivities"])),
                  f"submission: {res['submission_csv']}",
                  f"FROC curve: {os.path.join(os.path.dirname(res['submission_csv']), 'froc.png')}"]
    lines.append(f"record: {os.path.join(fold_dir, FOLD_RECORD)}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------


def run(mode: str, config, workdir: str, *, restart: bool = False, cv_step: str = "all"
        ) -> dict:
    """``--mode``: train | evaluate | cv | export (see the module docstring); ``restart``:
    see :func:`run_stages`; ``cv_step``: see :func:`cross_validate`."""
    if mode in ("train", "evaluate"):
        banner(f"{config.name}: fold {config.data.fold} in {workdir}")
        record = run_fold(config, workdir, evaluate_only=mode == "evaluate", restart=restart)
        print_fold(record, workdir)
        return record
    if mode == "cv":
        return cross_validate(config, workdir, restart=restart, step=cv_step)
    if mode == "export":
        return export(config, workdir)
    raise ValueError(f"unknown mode {mode!r} (train | cv | evaluate | export)")


def cv_folds(config) -> list[int]:
    return [int(k) for k in (list(config.cv.folds) or range(config.data.num_folds))]


def cross_validate(config, workdir: str, *, restart: bool = False, step: str = "all") -> dict:
    """Cross-validation over ``cv.folds``, whole or one step of it (``step``):

    * "all": every fold (each resumable: finished stages are skipped) with the variants,
      then the reports;
    * "prepare": only the data (generated and preprocessed once, for fold jobs that start
      together, ``lungjax.cv_launch``);
    * "folds": the folds, no report (one job of a scheduler's array);
    * "report": the reports from the folds that finished (``fold_<k>/fold.json``); the
      others are listed as missing, in the report and on the console.
    """
    from lungjax.evaluation.reports import cv_report
    from lungjax.train_data import prepare_data

    if step not in CV_STEPS:
        raise ValueError(f"cv step {step!r}: expected one of {CV_STEPS}")
    if step == "prepare":
        return {"store": prepare_data(config)}
    records, missing, engines = [], [], {}
    for k in cv_folds(config):
        fold_dir = os.path.join(workdir, f"fold_{k}")
        if step == "report":
            rec = read_json(os.path.join(fold_dir, FOLD_RECORD))
            if rec is None:
                missing.append(k)
            else:
                records.append(rec)
            continue
        cfg = fold_config(config, k)
        rec = run_fold(cfg, fold_dir, variants=True, engines=engines, restart=restart)
        print_fold(rec, fold_dir)
        records.append(rec)
    if step == "folds":
        return {"folds": [int(r["fold"]) for r in records]}
    if missing:
        print(f"cross-validation: fold(s) {missing} have not finished (no fold.json); the "
              f"report covers folds {[int(r['fold']) for r in records]}", flush=True)
    if not records:
        raise ValueError(f"{workdir}: no finished fold of {cv_folds(config)} to report on")
    out = os.path.join(workdir, "cv")
    report = cv_report([fold_metrics(r) for r in records], out,
                       title=f"{config.name}: {len(records)}-fold cross-validation",
                       pooled=pooled_froc(config, records), missing_folds=missing)
    print(f"cross-validation report: {report.get('files', out)}", flush=True)
    if config.cv.report:
        report = CV_REPORTS.get(config.cv.report)(config, workdir, records, report)
    return report


def fold_metrics(record: dict) -> dict:
    """One row of the CV table: every number the final stage's evaluation measured
    (FROC: CPM, FROC[new], sensitivity at each FP rate; training: held-out patch figures)."""
    out: dict[str, Any] = {"fold": int(record["fold"])}
    res = record["result"]
    for k, v in res.items():
        if k.startswith("eval/") and isinstance(v, dict):
            out.update({f"{k[5:]}_{m}": x for m, x in v.items()})
    if "cpm" in res:
        out["cpm"], out["froc_new"] = res["cpm"], res["froc_new"]
        for rate, sens in zip(res["fp_rates"], res["sensitivities"]):
            out[f"sens@{rate:g}"] = float(sens)
        out["seconds_per_scan"] = res["mean_seconds_per_scan"]
    return out


def fold_marks(record: dict, variant: str = ""):
    """(held-out uids, marks) of a fold record's final stage (or a variant's)."""
    from lungjax.data.tables import read_marks_csv

    res = record["result"] if not variant else \
        record["variants"][variant]["stages"][record["final_stage"]]
    return record["uids"], read_marks_csv(res["submission_csv"])


def pooled_froc(config, records: Sequence[dict], variant: str = ""):
    """FROC of every fold's held-out marks pooled into one evaluation (LUNA16 style), or
    None when the final stage has no marks."""
    from lungjax.data.store import PatchStore
    from lungjax.evaluation.reports import pooled_froc as _pooled
    from lungjax.train_data import prepare_data

    if not all("submission_csv" in r["result"] for r in records):
        return None
    if variant and not all(variant in r["variants"] for r in records):
        return None
    parts = [fold_marks(r, variant) for r in records]
    store = PatchStore.open(prepare_data(config))
    uids = [u for us, _ in parts for u in us]
    return _pooled(store.findings(uids), store.excluded(uids), parts)


def export(config, workdir: str) -> dict:
    """Every stage that applies a network -> ``<workdir>/export/<stage>``; the stage list
    with each stage's kind and folder -> ``<workdir>/export/method.json``."""
    banner(f"export: {config.name}")
    ctx = FoldContext(config, workdir, None, [], [])
    specs = stage_specs(config)
    by_name = dict(specs)
    out_root = os.path.join(workdir, "export")
    method: dict[str, Any] = {"config_name": config.name, "stages": []}
    sidecars = {}
    for name, spec in specs:
        if not spec["network"] or spec["kind"] not in STAGE_EXPORTS:
            continue
        net = spec["network"]
        run_dir = os.path.join(workdir, net)
        if not fileio.isdir(os.path.join(run_dir, "checkpoints")):
            raise FileNotFoundError(f"{run_dir}: stage {net!r} has no checkpoints; run "
                                    "--mode=train first")
        # What the stage takes from, as run_stages gives it: folders and configs.
        refs = [spec[f] for f in REFERENCES if spec[f]]
        run = StageRun(name, spec, stage_config(config, name, spec),
                       os.path.join(out_root, name), ctx,
                       {r: os.path.join(workdir, r) for r in refs}, {},
                       {r: stage_config(config, r, by_name[r]) for r in refs})
        sidecars[name] = STAGE_EXPORTS.get(spec["kind"])(run)
        method["stages"].append({"name": name, "kind": spec["kind"], "network": net,
                                 "dir": name})
    write_json(os.path.join(out_root, METHOD_JSON), method)
    print(f"exported {', '.join(sidecars) or 'nothing'} to {out_root}", flush=True)
    return sidecars


# ----------------------------------------------------------------------------------
# Stage kinds of the engine: train, detect
# ----------------------------------------------------------------------------------


def _engine_key(cfg) -> str:
    d = as_dict(cfg)
    d["data"].pop("fold", None)
    d.pop("name", None)
    return json.dumps(d, sort_keys=True, default=str)


@STAGES.register("train")
def train_stage(run: StageRun) -> dict:
    """Trains the stage's network (resuming from its checkpoint); the record is the
    training summary (``step``, last ``train`` figures, ``eval/<name>`` figures)."""
    cfg, spec = run.config, run.spec
    with cfg.unlocked():
        if spec["init_from"]:
            cfg.train.init_from = run.dirs[spec["init_from"]]
        if spec["init_paths"]:
            cfg.train.init_paths = tuple(spec["init_paths"])
    data = None
    if spec["hard_negatives_from"]:
        data = hard_negative_data(cfg, run)
    engine = None
    if not cfg.train.init_from:  # init params depend on the fold's earlier stage
        key = _engine_key(cfg)
        engine = run.ctx.engines.get(key) or train_lib.build_engine(cfg)
        run.ctx.engines[key] = engine
    result = train_lib.train_and_evaluate(cfg, run.dir, data=data, engine=engine)
    if result["preempted"]:
        raise SystemExit(f"{cfg.name}: preempted at step {result['step']}; rerun the same "
                         "command to resume")
    rec = {k: v for k, v in result.items() if k != "state"}
    patches = rec.get("eval/patches")
    if patches:
        rec["summary_line"] = (f"trained {rec['step']} steps; held-out patches " + ", ".join(
            f"{k} {v:.3f}" for k, v in patches.items() if k in ("loss", "auc", "sensitivity")))
    return rec


def hard_negative_data(cfg, run: StageRun):
    """The stage's ``TrainData`` with the training-scan candidates of the screening stage
    ``hard_negatives_from`` added to its sampler as hard negatives."""
    from lungjax.train_data import build_train_data
    from lungjax.methods.candidates import load_candidates

    src = run.spec["hard_negatives_from"]
    cands = load_candidates(os.path.join(run.dirs[src], "candidates_train.npz"))
    data = build_train_data(cfg)
    screened = [u for u in run.ctx.train_uids if u in cands]
    uids = [u for u in screened for _ in range(len(cands[u]["score"]))]
    vox = (np.concatenate([cands[u]["voxel_zyx"] for u in screened])
           if uids else np.zeros((0, 3)))
    score = np.concatenate([cands[u]["score"] for u in screened]) if uids else np.zeros(0)
    added = data.sampler.add_false_positives(uids, vox, score) if uids else 0
    print(f"{run.name} sampler: {added} {src} false positives of {len(screened)} screened "
          f"training scans as hard negatives; pool {data.sampler.counts()}", flush=True)
    if not added:
        # A screening network that leaves no false positive (tiny runs): candidates_V2
        # negatives stand in, so the stage still has negatives to learn from.
        print(f"{run.name} sampler: no false positives; using candidate negatives",
              flush=True)
        data.sampler.cfg = dataclasses.replace(data.sampler.cfg,
                                               negative_mix=(("candidate", 1.0),))
    return data


def restore_variables(run_dir: str, network: str | None = None) -> tuple[dict, int]:
    """(Flax variables, step) of the latest checkpoint of a "train" stage folder;
    ``network`` picks one of a multi-network stage (e.g. "segmenter")."""
    from lungjax.checkpointing import restore_params

    ck = restore_params(os.path.join(run_dir, "checkpoints"), network=network)
    return {"params": ck["params"], **ck["model_state"]}, int(ck["step"])


def scan_model(cfg):
    """The stage's model as used on whole scans (``detection.conv_impl``: the CPU-fast
    im2col formulations do not fit in memory at scan size)."""
    model = train_lib.build_model(cfg)
    if cfg.detection.conv_impl and "conv_impl" in model.__dataclass_fields__:
        model = model.clone(conv_impl=cfg.detection.conv_impl)
    return model


@DETECTORS.register("score_volume")
def score_volume_detector(config, model, task, variables, store, uids, *, progress=True):
    """Whole-scan detection with a fully convolutional scoring network (its
    ``layer_specs`` map output cells to input voxels): threshold, NMS, marks."""
    from lungjax.detect import DetectionSettings, run_detection
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    mapping = output_mapping(model.layer_specs(), center="patch")
    settings = DetectionSettings.from_config(config.detection.to_dict())
    return run_detection(make_predict_fn(model, task, config.data.spatial_dims), store,
                         list(uids), mapping, settings, variables=variables,
                         progress=progress)


@STAGES.register("detect")
def detect_stage(run: StageRun) -> dict:
    """Detects nodules on the held-out scans with the network of stage ``network``
    (``detection.detector`` picks the whole-scan detector) and scores the marks."""
    cfg = run.config
    model, task = scan_model(cfg), train_lib.build_task(cfg)
    variables, step = restore_variables(run.dirs[run.spec["network"]])
    det = DETECTORS.get(cfg.detection.detector)(cfg, model, task, variables, run.ctx.store,
                                                run.ctx.test_uids, progress=run.progress)
    return evaluate_marks(run, det.marks, None, det.seconds, step)


def evaluate_marks(run: StageRun, marks, diameters, seconds: Mapping[str, Mapping[str, float]],
                   step: int, extra: Mapping[str, Any] | None = None) -> dict:
    """The stage's marks -> ``<stage>/eval/``: submission.csv, and with the "froc"
    evaluator froc.json + froc.png + the fold's learning curves; returns the record."""
    from lungjax.detect import write_submission

    out_dir = os.path.join(run.dir, "eval")
    fileio.makedirs(out_dir)
    sub = os.path.join(out_dir, "submission.csv")
    if jax.process_index() == 0:
        write_submission(sub, marks, diameters)
    uids = run.ctx.test_uids
    record: dict[str, Any] = {
        "network": run.config.model.name, "step": int(step), "fold": int(run.ctx.config.data.fold),
        "uids": list(uids), "marks": len(marks.uid), "submission_csv": sub,
        "seconds_per_scan": {u: dict(v) for u, v in seconds.items()},
        "mean_seconds_per_scan": float(np.mean([v["total"] for v in seconds.values()]))
        if seconds else 0.0,
    }
    record.update(extra or {})
    if run.spec["evaluator"]:
        record.update(EVALUATIONS[run.spec["evaluator"]](run, marks, out_dir))
    if jax.process_index() == 0:  # the learning curves beside the result they led to
        from lungjax.evaluation.plots import plot_run_learning_curves

        plot_run_learning_curves(out_dir, {
            f"learning_curve_{n}.png": run.dirs[n] for n, s in
            dict(stage_specs(run.ctx.config)).items() if s["kind"] == "train" and n in run.dirs})
    return record


def held_out_froc(run: StageRun, marks, n_bootstrap: int = 0):
    """``lungjax.evaluation.froc.compute_froc`` of ``marks`` against the fold's held-out
    scans (their findings and excluded findings in the store)."""
    from lungjax.evaluation.froc import compute_froc

    store, uids = run.ctx.store, run.ctx.test_uids
    return compute_froc(store.findings(uids), store.excluded(uids), uids, marks,
                        n_bootstrap=n_bootstrap, seed=int(run.config.seed))


def froc_evaluation(run: StageRun, marks, out_dir: str) -> dict:
    """LUNA16 FROC of the held-out marks (bootstrap interval over scans), froc.json and
    froc.png in ``out_dir``."""
    from lungjax.evaluation.froc import FP_RATES, N_BOOTSTRAP

    uids = run.ctx.test_uids
    froc = held_out_froc(run, marks, N_BOOTSTRAP)
    rec = {"cpm": froc.cpm, "cpm_ci95": froc.cpm_ci95, "froc_new": froc.froc_new,
           "fp_rates": list(FP_RATES),
           "sensitivities": np.asarray(froc.sensitivities).tolist(),
           "sensitivity_at_1fp": float(froc.sensitivities[list(FP_RATES).index(1.0)]),
           "n_nodules": froc.n_nodules, "n_detected": froc.n_detected,
           "froc": froc.to_json()}
    write_json(os.path.join(out_dir, "froc.json"), rec)
    if jax.process_index() == 0:
        from lungjax.evaluation.plots import plot_froc

        plot_froc(froc, os.path.join(out_dir, "froc.png"), label=run.config.model.name,
                  title=f"FROC: {run.ctx.config.name} {run.name}, fold "
                        f"{int(run.ctx.config.data.fold)} ({len(uids)} held-out scans)")
    lo, hi = froc.cpm_ci95
    rec["summary_line"] = (f"CPM {froc.cpm:.4f} (95% CI {lo:.3f}-{hi:.3f}), "
                           f"{froc.n_detected}/{froc.n_nodules} nodules hit, sensitivity at "
                           f"1 FP/scan {rec['sensitivity_at_1fp']:.3f}")
    return rec


# Evaluators of a stage's held-out output, by ``config.stages.<s>.evaluator``.
EVALUATIONS: dict[str, Callable[..., dict]] = {"froc": froc_evaluation}


def export_stage(run: StageRun, predict, size, extra_meta: Mapping[str, Any],
                 min_size_zyx=None, multiple_of: int = 1, rebuild: str | None = None) -> dict:
    """Exports stage ``run``'s network (the latest checkpoint of stage ``network``) with
    ``predict(variables, image)`` to ``run.dir``; the sidecar carries the preprocessing
    the store applied, so a predictor reads scans exactly as training did. ``rebuild``:
    what ``predict`` computes from the model and task (``lungjax.export.REBUILD_OUTPUTS``),
    so that a predictor runs the network rebuilt with ``detection.conv_impl``'s plans per
    input shape (``lungjax.export.load_predictor``); None: the serialized function only."""
    from lungjax import export as export_lib

    cfg = run.config
    meta = {"model": as_dict(cfg.model), "task": as_dict(cfg.task), "config_name": cfg.name,
            "stage": run.name, "kind": run.spec["kind"],
            "preprocessing": {"spacing_zyx": list(cfg.data.spacing_zyx),
                              "hu_window": list(cfg.data.hu_window),
                              "intensity": "clip(HU, hu_window) scaled linearly to [0, 1]",
                              "patch_size_zyx": list(cfg.data.patch_size_zyx)}}
    meta["preprocessing"].update(store_preprocessing(cfg))
    if rebuild:
        meta["rebuild"] = export_lib.rebuild_spec(rebuild, cfg.detection.conv_impl or "auto",
                                                  cfg.train.compute_dtype)
    meta.update(extra_meta)
    return export_lib.export_network(
        run.dir, os.path.join(run.dirs[run.spec["network"]], "checkpoints"), predict, size,
        meta, network=cfg.train.network, min_size_zyx=min_size_zyx, multiple_of=multiple_of)


def store_preprocessing(config) -> dict:
    """The prepared store's preprocessing settings (margin, closing, ...), when it exists."""
    from lungjax.data.store import read_manifest
    from lungjax.train_data import default_store_path

    path = config.data.store or default_store_path(config)
    try:
        manifest = read_manifest(path)
    except Exception:  # no store at that path: the config's own settings stand
        return {}
    keys = ("spacing_zyx", "hu_window", "margin_mm", "closing_mm", "use_lung_masks")
    return {k: manifest[k] for k in keys if manifest and k in manifest}


def _export_detect(run: StageRun) -> dict:
    from lungjax.registry import EXPORTED_DETECTORS
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    cfg = run.config
    if cfg.detection.detector != "score_volume":  # the detector knows how it exports
        return EXPORTED_DETECTORS.get(cfg.detection.detector).export(run)
    model, task = scan_model(cfg), train_lib.build_task(cfg)
    # A screening network runs on whole scans: spatial sizes stay symbolic (any size from
    # the receptive field up) unless export.input_size_zyx fixes them.
    m = output_mapping(model.layer_specs(), center="patch")
    size = tuple(cfg.export.input_size_zyx) or (None,) * len(cfg.data.patch_size_zyx)
    min_size = None if cfg.export.input_size_zyx else tuple(int(r) for r in
                                                            m.receptive_field_zyx)
    meta = {"detection": as_dict(cfg.detection), "output_mapping": m.to_json()}
    return export_stage(run, make_predict_fn(model, task), size, meta, min_size,
                        rebuild="probability")


STAGE_EXPORTS.register("detect", _export_detect)
