"""Serialized inference artifact: params tree + ``jax.export`` predict fn + JSON sidecar.

Layout of an export directory::

    params.msgpack     the Flax variables ({"params": ..., other collections}) as msgpack
    predict.jax        serialized ``jax.export.Exported`` of ``predict(variables, image)``
                       with a symbolic batch size ("b"); image (b, *input_size_zyx, 1) float32,
                       where spatial sizes may be symbolic too ("d", "h", "w") for fully
                       convolutional models (any size at least the receptive field)
    export.json        metadata: preprocessing (spacing, HU window, intensity scaling), input
                       size and axis order, output mapping, model/task names, versions

``load_predictor(dir)`` rebuilds a callable ``predict(image) -> probabilities`` with no
model code (only jax and flax serialization are needed). A sidecar with a ``rebuild``
section ({"output": one of ``REBUILD_OUTPUTS``, "conv_impl", "compute_dtype"}:
what the serialized function computes from the sidecar's ``model`` and ``task``) is run as
the lungjax network itself where this installation has that model, jitted per input
shape: a function exported for any volume size was traced with symbolic sizes, where no
CPU-fast convolution plan has a bounded buffer, so every layer of the serialized one runs
XLA's native convolution (dou2017's FCN on a 1 mm 300^3 scan: ~190 s against ~30 s
rebuilt, ``bench/dou2017_inference.py``); rebuilt, each concrete shape gets the plans
measured on the machine that runs it.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from lungjax import fileio
from lungjax.atomic import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1


_SPATIAL_NAMES = ("d", "h", "w")


def export_predictor(out_dir: str, predict_fn: Callable, variables: Any,
                     input_size_zyx, metadata: dict, channels: int = 1,
                     min_size_zyx=None, multiple_of: int = 1) -> dict:
    """Writes the artifact; returns the sidecar dict.

    Args:
      out_dir: directory to create / overwrite (files are written atomically).
      predict_fn: pure ``(variables, image) -> probabilities``
        (``lungjax.steps.make_predict_fn``).
      variables: the Flax variables (numpy or jax arrays).
      input_size_zyx: spatial input size the function is exported for (e.g. (10, 30, 30));
        an entry None makes that axis symbolic. The batch size is always symbolic.
      min_size_zyx: lower bounds of symbolic axes (e.g. the receptive field).
      multiple_of: symbolic axes take only multiples of this (a network whose strided
        stages and upsampling must line up, e.g. 16 for a stride-16 backbone + FPN).
      metadata: extra sidecar fields (preprocessing, model name, ...).
      channels: input channels (channels-last).
    """
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x), flax.core.unfreeze(variables))
    var_spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    names = _SPATIAL_NAMES[-len(input_size_zyx):]
    sym = [n for n, s in zip(names, input_size_zyx) if s is None]
    mins = min_size_zyx or (1,) * len(input_size_zyx)
    k = int(multiple_of)
    constraints = [f"{n} >= {-(-int(m) // k)}" for n, s, m in zip(names, input_size_zyx, mins)
                   if s is None]
    dims = jax.export.symbolic_shape(", ".join(["b", *sym]), constraints=constraints)
    b, sym_dims = dims[0], iter(dims[1:])
    spatial = [k * next(sym_dims) if s is None else int(s) for s in input_size_zyx]
    img_spec = jax.ShapeDtypeStruct((b, *spatial, channels), jnp.float32)
    exported = jax.export.export(jax.jit(predict_fn), platforms=("cpu", "cuda"))(
        var_spec, img_spec)
    out_shape = [str(d) for d in exported.out_avals[0].shape]
    sidecar = {
        "format_version": FORMAT_VERSION,
        "input": {"shape": ["b", *[str(d) if s is None else int(s)
                                   for d, s in zip(spatial, input_size_zyx)], channels],
                  "dtype": "float32", "axis_order": "batch, z, y, x, channel",
                  "layout": "channels-last"},
        "output": {"shape": out_shape, "dtype": str(exported.out_avals[0].dtype),
                   "meaning": "probability of the positive class per output cell"},
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "lungjax": _lungjax_version()},
        **metadata,
    }
    fileio.makedirs(out_dir)
    atomic_write_bytes(os.path.join(out_dir, "params.msgpack"),
                        serialization.msgpack_serialize(variables))
    atomic_write_bytes(os.path.join(out_dir, "predict.jax"), exported.serialize())
    atomic_write_text(os.path.join(out_dir, "export.json"),
                      json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default) + "\n")
    return sidecar


def export_network(out_dir: str, checkpoint_dir: str, predict_fn: Callable, input_size_zyx,
                   metadata: dict, network: str | None = None, step: int | None = None,
                   channels: int = 1, min_size_zyx=None, multiple_of: int = 1) -> dict:
    """``export_predictor`` of one network of a run's checkpoint.

    Args:
      checkpoint_dir: the run's ``checkpoints`` directory.
      network: the network of the stage to export (e.g. "segmenter"); None for a stage
        with a single network.
      step: a checkpoint step; default the latest.
      out_dir, predict_fn, input_size_zyx, metadata, channels, min_size_zyx, multiple_of:
        as in ``export_predictor``; the sidecar also records ``network`` and
        ``checkpoint_step``.
    """
    from lungjax.checkpointing import restore_params

    ck = restore_params(checkpoint_dir, step=step, network=network)
    variables = {"params": ck["params"], **ck["model_state"]}
    meta = {**metadata, "network": ck["network"], "checkpoint_step": ck["step"]}
    return export_predictor(out_dir, predict_fn, variables, input_size_zyx, meta,
                            channels=channels, min_size_zyx=min_size_zyx,
                            multiple_of=multiple_of)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def _lungjax_version() -> str:
    try:
        from importlib.metadata import version

        return version("lungjax")
    except Exception:  # not installed as a distribution (source checkout)
        return "unknown"


# What a rebuilt network computes (the sidecar's ``rebuild.output``): its raw outputs, the
# task's probability / log-odds per output cell (``lungjax.steps.make_predict_fn``), or a
# candidate classifier's columns (``lungjax.methods.candidates.candidate_columns``).
REBUILD_OUTPUTS = ("heads", "probability", "log_odds", "candidate_columns")


def rebuild_spec(output: str, conv_impl: str = "auto", compute_dtype: str = "float32") -> dict:
    """The sidecar's ``rebuild`` section for an exported ``predict`` that computes
    ``output`` (:data:`REBUILD_OUTPUTS`) from the sidecar's ``model`` and ``task``."""
    if output not in REBUILD_OUTPUTS:
        raise ValueError(f"rebuild output {output!r}: expected one of {REBUILD_OUTPUTS}")
    return {"output": output, "conv_impl": conv_impl, "compute_dtype": compute_dtype}


def _rebuilt(sidecar: dict) -> Callable | None:
    """The jitted ``(variables, image) -> outputs`` of the sidecar's network rebuilt from
    its ``model`` and ``task``; None when there is no ``rebuild`` section or this
    installation lacks the model (then the serialized function runs)."""
    from ml_collections import config_dict

    from lungjax.registry import MODELS, TASKS
    from lungjax.stages import scan_model
    from lungjax.steps import forward_apply, make_predict_fn

    how = sidecar.get("rebuild")
    model_cfg = sidecar.get("model")
    if not how or not model_cfg or model_cfg.get("name") not in MODELS:
        return None
    model = scan_model(config_dict.ConfigDict({
        "model": model_cfg, "train": {"compute_dtype": how.get("compute_dtype", "float32")},
        "detection": {"conv_impl": how.get("conv_impl") or "auto"}}))
    if how["output"] == "heads":
        return jax.jit(lambda variables, image: forward_apply(model, variables, image))
    task = TASKS.build(sidecar["task"])
    if how["output"] == "candidate_columns":
        from lungjax.methods.candidates import candidate_columns

        return jax.jit(candidate_columns(model, task))
    return jax.jit(make_predict_fn(model, task, output=how["output"]))


def load_predictor(export_dir: str, rebuild: bool = True
                   ) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Loads an export directory.

    Args:
      export_dir: the directory (local or a bucket URL).
      rebuild: run the network rebuilt from the sidecar where it says how (module
        docstring); False: always the serialized function.

    Returns:
      (predict, sidecar): ``predict(image)`` takes (B, *input_size_zyx[, 1]) float32 in the
      sidecar's preprocessing and returns the exported probabilities as numpy.
    """
    for name in ("params.msgpack", "predict.jax", "export.json"):
        if not fileio.isfile(os.path.join(export_dir, name)):
            raise FileNotFoundError(f"export directory {export_dir} lacks {name}")
    with fileio.open_file(os.path.join(export_dir, "export.json"), encoding="utf-8") as f:
        sidecar = json.load(f)
    if sidecar.get("format_version") != FORMAT_VERSION:
        theirs = sidecar.get("versions", {}).get("lungjax", "unknown")
        raise ValueError(f"{export_dir}/export.json: written by lungjax {theirs} (export format "
                         f"{sidecar.get('format_version')}); this is lungjax "
                         f"{_lungjax_version()} (format {FORMAT_VERSION}): export the model "
                         "again with this version")
    with fileio.open_file(os.path.join(export_dir, "params.msgpack"), "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    call = _rebuilt(sidecar) if rebuild else None
    if call is None:
        with fileio.open_file(os.path.join(export_dir, "predict.jax"), "rb") as f:
            call = jax.export.deserialize(bytearray(f.read())).call

    def predict(image):
        x = np.asarray(image, np.float32)
        if x.ndim == len(sidecar["input"]["shape"]) - 1:
            x = x[..., None]
        # One array, or a tuple of them for a network with several heads.
        return jax.tree_util.tree_map(np.asarray, call(variables, x))

    return predict, sidecar
