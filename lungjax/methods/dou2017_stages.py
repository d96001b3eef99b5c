"""The pieces of dou2017 that run between trainings: stage configs, stage-1 candidates on
whole scans, stage-2 scoring of candidate patches, and the records they leave on disk.

All voxel coordinates are in the prepared store's grid, (z, y, x); world points are
(x, y, z) mm (``lungjax.data.coords``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lungjax import train as train_lib
from lungjax.data.tables import Marks, atomic_write_json
from lungjax.models.fpr import FCN_TRANSFER_PATHS

NETWORKS = ("deepnet", "resnet", "resnet_hl")
# Sections of ``config.stage2`` that replace the stage-1 section outright (the FCN's
# model/task fields mean nothing to the stage-2 network); the others are merged.
_REPLACED = ("model", "task", "evals")
_NOT_SECTIONS = ("networks", "inference_batch", "regressed_position")


# ---------------------------------------------------------------------------- configs


def _merge(dst: ConfigDict, src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and k in dst and isinstance(dst[k], ConfigDict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def stage1_config(config, osf: bool = True):
    """The screening FCN's training config (``osf=False``: the paper's ablation)."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.train.osf.enabled = bool(osf)
        cfg.name = f"{config.name}_stage1" + ("" if osf else "_no_osf")
    return cfg


def stage2_config(config, network: str, stage1_dir: str | None):
    """The FP-reduction network's training config.

    ``config.stage2`` sections override the run config; ``model.name`` is
    ``dou2017_fpr_<network>``; conv1-3 take the FCN's widths and kernels and, when
    ``stage1_dir`` is given, its trained weights (``train.init_from``).
    """
    if network not in NETWORKS:
        raise ValueError(f"config.stage2.networks: unknown network {network!r}; known: "
                         f"{', '.join(NETWORKS)}")
    s2 = config.stage2.to_dict()
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        for k, v in s2.items():
            if k in _NOT_SECTIONS:
                continue
            if k in _REPLACED:
                cfg[k] = ConfigDict(v)
            else:
                _merge(cfg[k], v)
        cfg.model.name = f"dou2017_fpr_{network}"
        cfg.model.trunk_features = tuple(int(f) for f in config.model.features[:3])
        cfg.model.trunk_kernels = tuple(tuple(int(v) for v in k) for k in config.model.kernels[:3])
        cfg.task.patch_size_zyx = tuple(cfg.data.patch_size_zyx)
        cfg.task.spacing_zyx = tuple(cfg.data.spacing_zyx)
        if stage1_dir:
            cfg.train.init_from = stage1_dir
            cfg.train.init_paths = FCN_TRANSFER_PATHS
        cfg.name = f"{config.name}_stage2_{network}"
    return cfg


# ---------------------------------------------------------------------------- records


def write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        atomic_write_json(path, obj)


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def load_candidates(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``save_candidates`` file -> {uid: {"voxel_zyx", "world_xyz", "score", "seconds"}}."""
    with np.load(path) as z:
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


# ---------------------------------------------------------------------------- stage 1


def screen_scans(config1, stage1_dir: str, store, uids: Sequence[str], *,
                 progress: bool = True):
    """Stage-1 screening of whole stored scans with the latest FCN checkpoint.

    Returns:
      ``lungjax.detect.DetectionRun`` (candidates in store voxels and world mm).
    """
    from lungjax.checkpointing import restore_params
    from lungjax.detect import DetectionSettings, run_detection
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    model = train_lib.build_model(config1)
    if config1.detection.conv_impl and hasattr(model, "conv_impl"):
        # Whole scans: the im2col formulations do not fit in memory at scan size.
        model = model.clone(conv_impl=config1.detection.conv_impl)
    task = train_lib.build_task(config1)
    ck = restore_params(os.path.join(stage1_dir, "checkpoints"))
    variables = {"params": ck["params"], **ck["model_state"]}
    mapping = output_mapping(model.layer_specs(), center="patch")
    # Ranked by log-odds: a trained FCN's probabilities saturate at 1.0 over many cells.
    settings = dataclasses.replace(DetectionSettings.from_config(config1.detection.to_dict()),
                                   log_odds=True)
    predict = make_predict_fn(model, task, config1.data.spatial_dims, output="log_odds")
    return run_detection(predict, store,
                         list(uids), mapping, settings, variables=variables,
                         progress=progress and jax.process_index() == 0)


# ---------------------------------------------------------------------------- stage 2


def crop(volume: np.ndarray, center_zyx, size_zyx) -> np.ndarray:
    """``PatchStore.read_patch`` on an in-memory volume: box starting at
    ``center - size // 2``, outside filled with 0. (size) float32."""
    size = np.asarray(size_zyx, np.int64)
    start = np.asarray(center_zyx, np.int64) - size // 2
    shape = np.asarray(volume.shape)
    lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
    out = np.zeros(tuple(size), np.float32)
    if np.all(hi > lo):
        a, b = lo - start, hi - start
        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


class CandidateClassifier:
    """Stage-2 scoring of candidate patches with an FP-reduction network.

    Args:
      model: the stage-2 Flax module; task: its ``HybridTask``.
      variables: its variables ({"params", "batch_stats"}).
      size_zyx: patch size (24, 60, 60).
      batch: patches per network call (the last call is padded: one compilation).
      step: checkpoint step the variables come from (for records).
    """

    def __init__(self, model, task, variables, size_zyx, batch: int = 32, step: int = 0):
        self.model, self.task, self.variables = model, task, variables
        self.size = tuple(int(s) for s in size_zyx)
        self.batch = int(batch)
        self.step = int(step)

        @jax.jit
        def _decode(variables, x):
            return task.decode(model.apply(variables, x, train=False))

        self._decode = _decode

    @classmethod
    def from_checkpoint(cls, config2, stage2_dir: str, batch: int = 32) -> "CandidateClassifier":
        """The latest checkpoint of the stage-2 run ``stage2_dir`` (config ``config2``)."""
        from lungjax.checkpointing import restore_params

        ck = restore_params(os.path.join(stage2_dir, "checkpoints"))
        return cls(train_lib.build_model(config2), train_lib.build_task(config2),
                   {"params": ck["params"], **ck["model_state"]},
                   config2.data.patch_size_zyx, batch, int(ck["step"]))

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
        parts: dict[str, list] = {}
        for i in range(0, len(centers), self.batch):
            c = centers[i:i + self.batch]
            x = np.zeros((self.batch, *self.size, 1), np.float32)
            for j, cj in enumerate(c):
                x[j, ..., 0] = crop(volume, cj, self.size)
            out = jax.device_get(self._decode(self.variables, jnp.asarray(x)))
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v, np.float64)[:len(c)])
        if not parts:
            out = {"score": np.zeros(0)}
            if getattr(self.model, "regression", False):
                out.update(diameter_mm=np.zeros(0), offset_zyx=np.zeros((0, 3)))
            return out
        return {k: np.concatenate(v) for k, v in parts.items()}


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
    from lungjax.data.coords import voxel_to_world
    from lungjax.tasks.hybrid import patch_geometric_center

    marks, diam, seconds = [], [], {}
    for uid in uids:
        t0 = time.perf_counter()
        c = cands[uid]
        volume = store.read_volume(uid) if len(c["score"]) else np.zeros((1, 1, 1), np.float32)
        out = classifier(volume, c["voxel_zyx"])
        xyz = c["world_xyz"]
        if regressed_position and "offset_zyx" in out and len(out["score"]):
            read = np.rint(np.asarray(c["voxel_zyx"], np.float64).reshape(-1, 3))
            vox = patch_geometric_center(read, classifier.size) + out["offset_zyx"]
            xyz = voxel_to_world(vox, store.scan(uid).geometry).reshape(-1, 3)
        marks.append(Marks(np.full(len(out["score"]), uid), xyz, out["score"]))
        if "diameter_mm" in out:
            diam.append(out["diameter_mm"])
        seconds[uid] = time.perf_counter() - t0
    d = np.concatenate(diam) if diam else None
    return Marks.concatenate(marks), d, seconds
