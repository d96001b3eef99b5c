"""Candidate stages: screen whole scans for candidates with a fully convolutional
network ("screen"), then score each candidate's patch with a second network
("classify_candidates"), as dou2017's two stages do. Both run on ``lungjax.stages``.

On disk, a "screen" stage folder holds ``candidates_test.npz`` (held-out scans) and,
when a later stage mines hard negatives from it (``hard_negatives_from``),
``candidates_train.npz`` (a spread subset of ``train_scans`` training scans, 0 = all); a
"classify_candidates" stage folder holds ``eval/`` (submission.csv, froc.json, froc.png).

All voxel coordinates are in the prepared store's grid, (z, y, x); world points are
(x, y, z) mm (``lungjax.data.coords``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax import fileio
from lungjax import train as train_lib
from lungjax.atomic import atomic_write_npz
from lungjax.data.sampler import spread_subset
from lungjax.data.tables import Marks
from lungjax.registry import STAGE_EXPORTS, STAGES
from lungjax.tasks.screening import crop_patch
from lungjax.stages import (StageError, StageRun, evaluate_marks, export_stage,
                            held_out_froc, restore_variables, scan_model)
from lungjax.steps import forward_apply


# ---------------------------------------------------------------------------- records


def save_candidates(path: str, cands: Mapping[str, Any], seconds: Mapping[str, dict]) -> None:
    """Stage-1 candidates of several scans -> one .npz (written atomically).

    Arrays: uid (K,) str, voxel_zyx (K, 3), world_xyz (K, 3), score (K,), and per scan
    ``scan_uid`` / ``scan_seconds`` (every screened scan, with or without candidates).
    """
    uids = list(cands)
    def cat(name, width):
        parts = [np.asarray(getattr(cands[u], name), np.float64).reshape(-1, width)
                 for u in uids]
        return np.concatenate(parts) if parts else np.zeros((0, width))
    arrays = {
        "uid": np.concatenate([np.full(len(cands[u]), u) for u in uids]) if uids
        else np.zeros(0, str),
        "voxel_zyx": cat("voxel_zyx", 3), "world_xyz": cat("world_xyz", 3),
        "score": cat("score", 1).reshape(-1),
        "scan_uid": np.asarray(uids, str),
        "scan_seconds": np.asarray([seconds[u]["total"] for u in uids], np.float64),
    }
    if jax.process_index() == 0:
        atomic_write_npz(path, **arrays)


def load_candidates(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``save_candidates`` file -> {uid: {"voxel_zyx", "world_xyz", "score", "seconds"}}."""
    with fileio.open_file(path, "rb") as f, np.load(f) as z:
        d = {k: z[k] for k in z.files}
    out = {}
    for u, sec in zip(d["scan_uid"], d["scan_seconds"]):
        m = d["uid"] == u
        out[str(u)] = {"voxel_zyx": d["voxel_zyx"][m], "world_xyz": d["world_xyz"][m],
                       "score": d["score"][m], "seconds": float(sec)}
    return out


def candidate_marks(cands: Mapping[str, Mapping[str, np.ndarray]]) -> Marks:
    """Stage-1 candidates as LUNA16 marks (world mm, stage-1 score)."""
    return Marks.concatenate([Marks(np.full(len(c["score"]), u), c["world_xyz"], c["score"])
                              for u, c in cands.items()])


# ---------------------------------------------------------------------------- screening


def screen_scans(config, network_dir: str, store, uids: Sequence[str], *,
                 progress: bool = True):
    """Screens whole stored scans with the latest checkpoint of a fully convolutional
    scoring network (its ``layer_specs`` map output cells to input voxels).

    Args:
      config: the network's run config (``detection`` section: threshold, NMS, ...).
      network_dir: the "train" stage folder of the network.
      store: ``PatchStore``; uids: scans, in order.

    Returns:
      ``lungjax.detect.DetectionRun`` (candidates in store voxels and world mm).
    """
    from lungjax.detect import DetectionSettings, run_detection
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    model, task = scan_model(config), train_lib.build_task(config)
    variables, _ = restore_variables(network_dir)
    mapping = output_mapping(model.layer_specs(), center="patch")
    # Ranked by log-odds: a trained FCN's probabilities saturate at 1.0 over many cells.
    settings = dataclasses.replace(DetectionSettings.from_config(config.detection.to_dict()),
                                   log_odds=True)
    predict = make_predict_fn(model, task, config.data.spatial_dims, output="log_odds")
    return run_detection(predict, store, list(uids), mapping, settings, variables=variables,
                         progress=progress and jax.process_index() == 0)


# ---------------------------------------------------------------------------- scoring


# The 8 mirror images of a 3D patch: every subset of the spatial axes (z, y, x) flipped.
MIRRORS = tuple(tuple(a for a in range(3) if m >> a & 1) for m in range(8))


def mirror_averaged(predict: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                    patches: np.ndarray, mirrors: bool,
                    identity: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A candidate classifier's outputs averaged over the mirror images of its patches.

    Stage 2 trains on patches flipped along every axis, so each mirror image is a view
    the network was taught to score alike; averaging the eight probabilities cancels
    part of the noise of any single view (held-out CPM 0.743 -> 0.796 and 0.626 -> 0.689
    on generated seeds 0 and 1, dou2017 default, the same trained network).

    Args:
      predict: (B, D, H, W, 1) float32 patches -> {"score": (B,), optionally
        "diameter_mm": (B,), "offset_zyx": (B, 3) voxels from the patch's geometric
        centre}, numpy.
      patches: (B, D, H, W, 1) float32.
      mirrors: False: ``predict(patches)`` as it is.
      identity: ``predict(patches)`` when the caller has it already (not recomputed).

    Returns:
      the averaged outputs: probabilities and diameters as they are, offsets mapped back
      through each flip (a flip about the patch's geometric centre negates that axis).
    """
    if not mirrors:
        return dict(predict(patches) if identity is None else identity)
    outs = []
    for axes in MIRRORS:
        if not axes and identity is not None:
            outs.append(dict(identity))
            continue
        o = dict(predict(np.flip(patches, tuple(a + 1 for a in axes)) if axes else patches))
        if "offset_zyx" in o:
            sign = np.ones(3)
            sign[list(axes)] = -1.0
            o["offset_zyx"] = np.asarray(o["offset_zyx"]) * sign
        outs.append(o)
    return {k: np.mean([np.asarray(o[k], np.float64) for o in outs], axis=0) for k in outs[0]}


def padded_to(batch: int, predict: Callable[[np.ndarray], Mapping[str, np.ndarray]]
              ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``predict`` called on exactly ``batch`` patches, zeros after the given ones, and its
    outputs cut back to those: one compilation serves every call. A scan's last batch
    has its own size, and each new size compiled the network again (3-4 s a scan for
    dou2017's stage 2 in ``python -m lungjax.detect``).

    ``predict``: (batch, D, H, W, 1) float32 -> {name: (batch, ...)}; the result takes
    (B, D, H, W, 1) with B <= ``batch``.
    """
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        if len(x) > batch:
            raise ValueError(f"{len(x)} patches in a call of at most {batch}")
        full = np.zeros((batch, *x.shape[1:]), np.float32)
        full[:len(x)] = x
        return {k: np.asarray(v)[:len(x)] for k, v in predict(full).items()}

    return run


def score_candidates(predict: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                     patches_of: Callable[[np.ndarray], np.ndarray], n: int, batch: int,
                     mirrors: bool, mirror_top: int = 0) -> dict[str, np.ndarray]:
    """Stage-2 outputs of ``n`` candidates, ``batch`` patches a network call.

    With ``mirrors`` each candidate's outputs are averaged over its 8 mirror images
    (:func:`mirror_averaged`). ``mirror_top`` > 0 spends the other seven views only on
    that many candidates, the best by their one-view score: a scan's FROC rests on its
    top few marks (the LUNA16 operating points end at 8 FPs per scan), and the views
    are 7/8 of stage 2's time.

    Args:
      predict: (B, D, H, W, 1) float32 patches, any B <= ``batch`` -> named outputs
        ({"score": (B,), ...}, numpy).
      patches_of: (k,) int64 candidate indices -> (k, D, H, W, 1) float32 patches.
      n: number of candidates; batch: patches per call.
      mirrors: average over mirror images; mirror_top: 0 = every candidate.

    Returns:
      {name: (n, ...) float64}; empty dict for n = 0.
    """
    def run(idx: np.ndarray, views: bool, first=None) -> dict[str, np.ndarray]:
        parts: dict[str, list] = {}
        for i in range(0, len(idx), batch):
            sel = idx[i:i + batch]
            given = None if first is None else {k: v[sel] for k, v in first.items()}
            for k, v in mirror_averaged(predict, patches_of(sel), views, given).items():
                parts.setdefault(k, []).append(np.asarray(v, np.float64))
        return {k: np.concatenate(v) for k, v in parts.items()}

    idx = np.arange(int(n))
    if n == 0:
        return {}
    if not mirrors or mirror_top <= 0 or n <= mirror_top:
        return run(idx, mirrors)
    once = run(idx, False)
    top = np.sort(np.argsort(-once["score"], kind="stable")[:int(mirror_top)])
    averaged = run(top, True, first=once)
    for k, v in averaged.items():
        once[k][top] = v
    return once


def score_patches_at(predict: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                     volume: np.ndarray, centres_zyx: np.ndarray, size_zyx: Sequence[int],
                     batch: int, mirrors: bool, mirror_top: int = 0) -> dict[str, np.ndarray]:
    """:func:`score_candidates` of the patches of ``volume`` (D, H, W) float32 at the (K, 3)
    int voxel centres (``crop_patch``: start = centre - size // 2, air outside), each
    network call padded to ``batch`` (:func:`padded_to`). What the classify stage and the
    predict command both run."""
    size = tuple(int(s) for s in size_zyx)

    def patches_of(idx):
        return np.stack([crop_patch(volume, centres_zyx[i], size)
                         for i in idx])[..., None].astype(np.float32)

    return score_candidates(padded_to(batch, predict), patches_of, len(centres_zyx), batch,
                            mirrors, mirror_top)


def merge_within_diameter(xyz: np.ndarray, score: np.ndarray, diameter: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scan's stage-2 marks, each mark inside the regressed diameter of a
    higher-scoring one merged into it.

    A large nodule's stage-1 score plateau has several peaks, most on its rim, and stage 2
    cannot tell a patch a few mm outside the radius from one just inside: rim marks
    1-6 mm beyond a 15-25 mm nodule's radius were the false positives that outranked true
    nodules on the generated default data. Taking marks in decreasing score, a mark whose
    distance to a kept mark is below that kept mark's regressed diameter joins it; each
    kept mark moves to the score-weighted mean position of its members (towards the
    nodule's centre when its members ring it) and keeps its score and diameter.
    The distance is the diameter, not the radius: a rim mark lies about one radius from
    the centre mark, so a radius rule keeps it (held-out CPM, dou2017 default, generated
    seeds 0 / 1 / 2, the same marks: 0.8408 / 0.6933 / 0.8571 -> 0.8653 / 0.7059 /
    0.8874; with the previous default's marks 0.7388 / 0.7101 / 0.7835 -> 0.7633 / 0.7227 /
    0.8615, where a radius rule changed none).

    Args:
      xyz: (M, 3) float world (x, y, z) mm; score: (M,); diameter: (M,) mm.

    Returns:
      (xyz (K, 3), score (K,), diameter (K,)), K <= M, highest score first.
    """
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    score = np.asarray(score, np.float64).reshape(-1)
    diameter = np.asarray(diameter, np.float64).reshape(-1)
    if not len(xyz) == len(score) == len(diameter):
        raise ValueError(f"merge_within_diameter: {len(xyz)} positions, {len(score)} scores, "
                         f"{len(diameter)} diameters")
    leaders: list[int] = []
    members: list[list[int]] = []
    for i in np.argsort(-score, kind="stable"):
        for k, lead in enumerate(leaders):
            if np.linalg.norm(xyz[i] - xyz[lead]) < diameter[lead]:
                members[k].append(int(i))
                break
        else:
            leaders.append(int(i))
            members.append([int(i)])
    # Scores of a trained network can be exactly 0; weigh those members equally.
    out = np.array([np.average(xyz[m], axis=0, weights=score[m] if score[m].sum() > 0 else None)
                    for m in members]).reshape(-1, 3)
    return out, score[leaders], diameter[leaders]


def merge_marks(marks: Marks, diameter: np.ndarray) -> tuple[Marks, np.ndarray]:
    """:func:`merge_within_diameter` on each scan of ``marks`` ((M,) diameters in mm)."""
    parts, diams = [], []
    for uid in dict.fromkeys(marks.uid.tolist()):
        s = marks.uid == uid
        xyz, score, diam = merge_within_diameter(marks.xyz[s], marks.probability[s],
                                                 np.asarray(diameter)[s])
        parts.append(Marks(np.full(len(score), uid), xyz, score))
        diams.append(diam)
    return Marks.concatenate(parts), (np.concatenate(diams) if diams else np.zeros(0))


class CandidateClassifier:
    """Stage-2 scoring of candidate patches with an FP-reduction network.

    Args:
      model: the stage-2 Flax module; task: its ``HybridTask``.
      variables: its variables ({"params", "batch_stats"}).
      size_zyx: patch size (24, 60, 60).
      batch: patches per network call (the last call is padded: one compilation).
      step: checkpoint step the variables come from (for records).
      mirrors: average each candidate's outputs over its patch's 8 mirror images
        (:func:`mirror_averaged`; 8x the network calls).
      mirror_top: only the best this many candidates by one view get the eight
        (:func:`score_candidates`; 0 = all).
    """

    def __init__(self, model, task, variables, size_zyx, batch: int = 32, step: int = 0,
                 mirrors: bool = False, mirror_top: int = 0):
        self.model, self.task, self.variables = model, task, variables
        self.size = tuple(int(s) for s in size_zyx)
        self.batch = int(batch)
        self.step = int(step)
        self.mirrors = bool(mirrors)
        self.mirror_top = int(mirror_top)

        @jax.jit
        def _decode(variables, x):
            return task.decode(forward_apply(model, variables, x))

        self._decode = _decode

    @classmethod
    def from_checkpoint(cls, config, network_dir: str, batch: int = 32,
                        mirrors: bool = False, mirror_top: int = 0) -> "CandidateClassifier":
        """The latest checkpoint of the "train" stage folder ``network_dir`` (run config
        ``config``)."""
        variables, step = restore_variables(network_dir)
        return cls(train_lib.build_model(config), train_lib.build_task(config), variables,
                   config.data.patch_size_zyx, batch, step, mirrors, mirror_top)

    def __call__(self, volume: np.ndarray, voxel_zyx: np.ndarray) -> dict[str, np.ndarray]:
        """Scores the candidates of one volume.

        Args:
          volume: (D, H, W) float32 in [0, 1], the store's image of the scan.
          voxel_zyx: (K, 3) candidate voxels (rounded to the patch centre voxel).

        Returns:
          ``score`` (K,) float64 and, for the hybrid network, ``diameter_mm`` (K,) and
          ``offset_zyx`` (K, 3) (voxels from the patch's geometric centre).
        """
        centers = np.rint(np.asarray(voxel_zyx, np.float64).reshape(-1, 3)).astype(np.int64)

        out = score_patches_at(
            lambda x: jax.device_get(self._decode(self.variables, jnp.asarray(x))), volume,
            centers, self.size, self.batch, self.mirrors, self.mirror_top)
        if not out:
            out = {"score": np.zeros(0)}
            if getattr(self.model, "regression", False):
                out.update(diameter_mm=np.zeros(0), offset_zyx=np.zeros((0, 3)))
        return out


def regressed_centres(read_zyx: np.ndarray, size_zyx: Sequence[int], offset_zyx: np.ndarray,
                      geometry) -> np.ndarray:
    """(K, 3) world (x, y, z) mm of the nodule centres stage 2 regressed: ``offset_zyx``
    ((K, 3) voxels) from the geometric centre of each patch of ``size_zyx`` read at the
    integer voxel ``read_zyx`` ((K, 3)) of a grid placed by ``geometry``."""
    from lungjax.data.coords import voxel_to_world
    from lungjax.tasks.hybrid import patch_geometric_center

    vox = patch_geometric_center(read_zyx, size_zyx) + np.asarray(offset_zyx).reshape(-1, 3)
    return voxel_to_world(vox, geometry).reshape(-1, 3)


def classify_scans(classifier: CandidateClassifier, store, cands: Mapping[str, Mapping],
                   uids: Sequence[str], *, regressed_position: bool = False
                   ) -> tuple[Marks, np.ndarray | None, dict[str, float]]:
    """Stage 2 on the stage-1 candidates of ``uids``.

    Args:
      regressed_position: a network with a regression head places each mark at its
        regressed nodule centre (the paper's T_x, T_y, T_z) instead of the stage-1
        candidate voxel, which sits on the score volume's stride-2 grid and can fall just
        outside a small nodule's radius.

    Returns:
      (marks at the regressed centres (or the candidates' positions) in world mm with the
      stage-2 probability, (M,) regressed diameters in mm or None for classification-only
      networks, {uid: stage-2 seconds}).
    """
    marks, diam, seconds = [], [], {}
    for uid in uids:
        t0 = time.perf_counter()
        c = cands[uid]
        volume = store.read_volume(uid) if len(c["score"]) else np.zeros((1, 1, 1), np.float32)
        out = classifier(volume, c["voxel_zyx"])
        xyz = c["world_xyz"]
        if regressed_position and "offset_zyx" in out and len(out["score"]):
            read = np.rint(np.asarray(c["voxel_zyx"], np.float64).reshape(-1, 3))
            xyz = regressed_centres(read, classifier.size, out["offset_zyx"],
                                    store.scan(uid).geometry)
        marks.append(Marks(np.full(len(out["score"]), uid), xyz, out["score"]))
        if "diameter_mm" in out:
            diam.append(out["diameter_mm"])
        seconds[uid] = time.perf_counter() - t0
    d = np.concatenate(diam) if diam else None
    return Marks.concatenate(marks), d, seconds


# ---------------------------------------------------------------------------- stages


@STAGES.register("screen")
def screen_stage(run: StageRun) -> dict:
    """Candidates of the held-out scans (and, for a later ``hard_negatives_from``, of
    ``train_scans`` training scans) from the network of stage ``network``; the record
    holds the held-out screening figures (every candidate counts)."""
    from lungjax.detect import store_screening_stats

    ctx, spec = run.ctx, run.spec
    train_uids = ctx.train_uids
    n = int(spec["train_scans"])
    if n and n < len(train_uids):  # CPU schedule: hard negatives from a spread subset
        train_uids = [train_uids[i] for i in spread_subset(len(train_uids), n)]
    parts = [("test", ctx.test_uids)]
    if run.needs_train_candidates and not ctx.evaluate_only:
        parts.append(("train", train_uids))
    cands, files = {}, {}
    for part, uids in parts:
        path = os.path.join(run.dir, f"candidates_{part}.npz")
        # A killed stage keeps the scans screened in full: screening is its largest cost.
        if ctx.evaluate_only or not fileio.isfile(path):
            banner_line = f"{run.name}: screening {len(uids)} {part} scans"
            print(banner_line, flush=True)
            det = screen_scans(run.config, run.dirs[spec["network"]], ctx.store, uids,
                               progress=run.progress)
            save_candidates(path, det.candidates, det.seconds)
        cands[part] = load_candidates(path)
        files[f"candidates_{part}"] = path
    stats = store_screening_stats(candidate_marks(cands["test"]), ctx.store, ctx.test_uids)
    stats.pop("missed")
    line = (f"sensitivity {stats['sensitivity']:.3f} ({stats['n_detected']}/"
            f"{stats['n_nodules']}), {stats['fps_per_scan']:.1f} FPs/scan, "
            f"{stats['candidates_per_scan']:.1f} candidates/scan")
    return {"stats": stats, **files, "network_dir": run.dirs[spec["network"]],
            "summary_line": line}


@STAGES.register("classify_candidates")
def classify_stage(run: StageRun) -> dict:
    """Scores the held-out candidates of stage ``candidates_from`` with the network of
    stage ``network`` (patches of its ``data.patch_size_zyx`` centred on each candidate);
    marks at the candidate (or, ``regressed_position``, the regressed centre)."""
    spec, ctx = run.spec, run.ctx
    src = spec["candidates_from"]
    clf = CandidateClassifier.from_checkpoint(run.config, run.dirs[spec["network"]],
                                              int(spec["batch"]), bool(spec["mirrors"]),
                                              int(spec["mirror_top"]))
    cands = load_candidates(os.path.join(run.dirs[src], "candidates_test.npz"))
    marks, diam, seconds = classify_scans(clf, ctx.store, cands, ctx.test_uids,
                                          regressed_position=bool(spec["regressed_position"]))
    screened = run.records[src]
    extra = {"candidates": screened["stats"]} if "stats" in screened else {}
    if spec["merge_within_diameter"]:
        if diam is None:
            raise StageError(f"config.stages.{run.name}.merge_within_diameter: network "
                             f"{spec['network']!r} regresses no diameter")
        if spec["evaluator"] == "froc":  # what the merge changed, in every record
            extra["cpm_unmerged"] = held_out_froc(run, marks).cpm
        marks, diam = merge_marks(marks, diam)
    per_scan = {u: {src: cands[u]["seconds"], run.name: seconds[u],
                    "total": cands[u]["seconds"] + seconds[u]} for u in ctx.test_uids}
    return evaluate_marks(run, marks, diam, per_scan, clf.step, extra)


def _export_screen(run: StageRun) -> dict:
    """The screening network on whole scans: spatial sizes stay symbolic (any size from
    the receptive field up) unless ``export.input_size_zyx`` fixes them; the predict
    command runs it rebuilt per scan shape (``lungjax.export``'s ``rebuild``)."""
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    cfg = run.config
    model, task = scan_model(cfg), train_lib.build_task(cfg)
    m = output_mapping(model.layer_specs(), center="patch")
    size = tuple(cfg.export.input_size_zyx) or (None,) * len(cfg.data.patch_size_zyx)
    min_size = None if cfg.export.input_size_zyx else tuple(int(r) for r in
                                                            m.receptive_field_zyx)
    # Log-odds and log-odds ranking, as the stage screened: a trained FCN's float32
    # probability is 1.0 on many cells, which would tie them.
    meta = {"output_mapping": m.to_json(), "detection": {**cfg.detection.to_dict(),
                                                         "log_odds": True},
            "output": "nodule log-odds per output cell"}
    return export_stage(run, make_predict_fn(model, task, output="log_odds"), size, meta,
                        min_size, rebuild="log_odds")


def candidate_columns(model, task) -> Callable:
    """``predict(variables, (B, D, H, W, 1) patches) -> (B, columns)`` float32 of a candidate
    classifier: column 0 its probability; a network with a regression head adds column 1,
    the diameter in mm, and columns 2-4, the nodule centre's offset (z, y, x) in voxels
    from the patch's geometric centre (what the classify stage's export computes)."""
    def predict(variables, image):
        dec = task.decode(forward_apply(model, variables, image))
        cols = [dec["score"]]
        if "diameter_mm" in dec:
            cols += [dec["diameter_mm"], *(dec["offset_zyx"][..., a] for a in range(3))]
        return jnp.stack(cols, axis=-1)

    return predict


def _export_classify(run: StageRun) -> dict:
    """The candidate classifier on (B, *patch, 1) patches: column 0 the probability;
    networks with a regression head add column 1, the diameter in mm, and columns 2-4,
    the nodule centre's offset (z, y, x) in voxels from the patch's geometric centre."""
    cfg = run.config
    model, task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    if cfg.detection.conv_impl:
        # Measured per-shape convolution choices need concrete shapes; the export's batch
        # size is symbolic.
        model = model.clone(conv_impl=cfg.detection.conv_impl)

    meaning = ("column 0: nodule probability of the candidate patch"
               + ("; column 1: regressed diameter (mm); columns 2-4: regressed centre, "
                  "(z, y, x) voxels from the patch's geometric centre" if model.regression
                  else ""))
    size = tuple(int(s) for s in cfg.data.patch_size_zyx)
    return export_stage(run, candidate_columns(model, task), size, {
        "output_columns": meaning, "patch_start": "candidate voxel - patch_size // 2",
        "mirrors": bool(run.spec["mirrors"]), "mirror_top": int(run.spec["mirror_top"]),
        "regressed_position": bool(run.spec["regressed_position"]),
        "merge_within_diameter": bool(run.spec["merge_within_diameter"])},
        rebuild="candidate_columns")


STAGE_EXPORTS.register("screen", _export_screen)
STAGE_EXPORTS.register("classify_candidates", _export_classify)
