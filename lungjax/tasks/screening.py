"""Fully convolutional screening: index mapping, tiled whole-scan scoring, candidates.

A network trained on patches and applied to a whole scan gives a score volume smaller
than the scan (strides, VALID borders). The index mapping (Dou et al. 2017, after Long
et al.'s FCN) takes a score cell back to the input voxel it speaks for:

    voxel_zyx = offset_zyx + stride_zyx * cell_zyx

computed from the layer list by receptive-field arithmetic (:func:`output_mapping`).
:func:`score_volume` runs the network over a whole (z, y, x) volume, optionally in tiles
with the halo the receptive field needs, stitched so the result is the untiled result.
:func:`candidates_from_scores` thresholds, suppresses (:func:`lungjax.tasks.nms.peaks_3d`)
and maps the peaks to voxels and world millimetres through the scan's ``Geometry``.

Conventions: arrays (z, y, x); world (x, y, z) mm (``lungjax.data.coords``); networks take
channels-last (B, D, H, W, 1) float32 input.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.tasks.nms import peaks_3d

# ---------------------------------------------------------------------------
# Index mapping.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputMapping:
    """Where each cell of a network's output sits in its input grid.

    Attributes:
      stride_zyx: (n,) int total stride: neighbouring cells are this many voxels apart.
      offset_zyx: (n,) float input voxel of cell 0 (may be fractional, e.g. x.5 for an
        even receptive field); cell c speaks for voxel ``offset + stride * c``.
      receptive_field_zyx: (n,) int extent of the input a cell sees (None if unknown;
        tiled scoring and padding need it).
      rf_start_zyx: (n,) int first input voxel of cell 0's receptive field (negative when
        the network pads). Defaults to ``floor(offset - (rf - 1) / 2)``, right for both
        the receptive-field-centre and the patch-centre (``start + rf // 2``) conventions.
    """

    stride_zyx: tuple
    offset_zyx: tuple
    receptive_field_zyx: tuple | None = None
    rf_start_zyx: tuple | None = None

    def __post_init__(self):
        stride = tuple(int(s) for s in np.atleast_1d(self.stride_zyx))
        offset = tuple(float(o) for o in np.atleast_1d(self.offset_zyx))
        if len(stride) != len(offset):
            raise ValueError(f"stride_zyx {stride} and offset_zyx {offset} differ in length")
        if any(s < 1 for s in stride):
            raise ValueError(f"stride_zyx must be >= 1, got {stride}")
        if not all(math.isfinite(o) for o in offset):
            raise ValueError(f"offset_zyx must be finite, got {offset}")
        rf = self.receptive_field_zyx
        start = self.rf_start_zyx
        if rf is not None:
            rf = tuple(int(r) for r in np.atleast_1d(rf))
            if len(rf) != len(stride) or any(r < 1 for r in rf):
                raise ValueError(f"receptive_field_zyx must be {len(stride)} values >= 1, got {rf}")
            if start is None:
                start = tuple(int(math.floor(o - (r - 1) / 2 + 1e-6)) for o, r in zip(offset, rf))
        if start is not None:
            start = tuple(int(s) for s in np.atleast_1d(start))
            if len(start) != len(stride):
                raise ValueError(f"rf_start_zyx {start} has the wrong length")
        object.__setattr__(self, "stride_zyx", stride)
        object.__setattr__(self, "offset_zyx", offset)
        object.__setattr__(self, "receptive_field_zyx", rf)
        object.__setattr__(self, "rf_start_zyx", start)

    @property
    def ndim(self) -> int:
        return len(self.stride_zyx)

    def cells_to_voxels(self, cells: np.ndarray) -> np.ndarray:
        """(..., n) cell indices -> (..., n) float64 input voxel coordinates."""
        cells = np.asarray(cells, np.float64)
        return np.asarray(self.offset_zyx) + np.asarray(self.stride_zyx) * cells

    def voxels_to_cells(self, voxels: np.ndarray) -> np.ndarray:
        """(..., n) input voxel coordinates -> (..., n) fractional cell coordinates."""
        voxels = np.asarray(voxels, np.float64)
        return (voxels - np.asarray(self.offset_zyx)) / np.asarray(self.stride_zyx)

    def shifted(self, delta_zyx: Sequence[int]) -> "OutputMapping":
        """The mapping into a grid whose voxel 0 is voxel ``-delta`` of this one's grid
        (e.g. ``shifted(-pad_lo)`` maps into the volume before padding)."""
        d = np.asarray(delta_zyx, np.int64).reshape(-1)
        if len(d) != self.ndim:
            raise ValueError(f"delta has {len(d)} values, mapping has {self.ndim} axes")
        start = None if self.rf_start_zyx is None else tuple(np.add(self.rf_start_zyx, d))
        return OutputMapping(self.stride_zyx, tuple(np.add(self.offset_zyx, d)),
                             self.receptive_field_zyx, start)

    def cell_size_mm(self, spacing_zyx: Sequence[float]) -> np.ndarray:
        """(n,) mm between neighbouring cells on an input grid of this spacing."""
        return np.asarray(self.stride_zyx, np.float64) * np.asarray(spacing_zyx, np.float64)

    def to_json(self) -> dict:
        return {"stride_zyx": list(self.stride_zyx), "offset_zyx": list(self.offset_zyx),
                "receptive_field_zyx": (None if self.receptive_field_zyx is None
                                        else list(self.receptive_field_zyx)),
                "rf_start_zyx": None if self.rf_start_zyx is None else list(self.rf_start_zyx)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OutputMapping":
        try:
            return cls(d["stride_zyx"], d["offset_zyx"], d.get("receptive_field_zyx"),
                       d.get("rf_start_zyx"))
        except KeyError as e:
            raise ValueError(f"output mapping JSON lacks field {e.args[0]!r}: {dict(d)}") from None


def _per_axis(value, ndim: int, what: str) -> tuple[int, ...]:
    v = np.atleast_1d(np.asarray(value))
    if v.size == 1:
        v = np.repeat(v, ndim)
    if v.shape != (ndim,) or np.any(v != np.round(v)):
        raise ValueError(f"{what} must be an int or {ndim} ints, got {value!r}")
    return tuple(int(x) for x in v)


def _parse_padding(padding, ndim: int, what: str):
    """-> "SAME" | list of (lo, hi) per axis."""
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return [(0, 0)] * ndim
        if p == "SAME":
            return "SAME"
        raise ValueError(f"{what}: padding must be 'SAME', 'VALID' or ints, got {padding!r}")
    arr = np.asarray(padding)
    if arr.ndim == 0 or arr.shape == (ndim,):
        lo = _per_axis(arr, ndim, what + " padding")
        return [(p, p) for p in lo]
    if arr.shape == (ndim, 2):
        return [(int(a), int(b)) for a, b in arr]
    raise ValueError(f"{what}: padding must be 'SAME', 'VALID', an int, {ndim} ints or "
                     f"{ndim} (lo, hi) pairs, got {padding!r}")


def _same_pad(n: int, k_eff: int, s: int) -> tuple[int, int]:
    """XLA's 'SAME' padding (``lax.padtype_to_pads``) of one axis of size n."""
    out = -(-n // s)
    total = max((out - 1) * s + k_eff - n, 0)
    return total // 2, total - total // 2


def _parse_layer(layer, ndim: int, i: int):
    if isinstance(layer, Mapping):
        kernel, stride = layer["kernel"], layer.get("stride", 1)
        padding, dilation = layer.get("padding", "VALID"), layer.get("dilation", 1)
    else:
        if not 2 <= len(layer) <= 4:
            raise ValueError(f"layer {i}: expected (kernel, stride[, padding[, dilation]]), "
                             f"got {layer!r}")
        kernel, stride = layer[0], layer[1]
        padding = layer[2] if len(layer) > 2 else "VALID"
        dilation = layer[3] if len(layer) > 3 else 1
    what = f"layer {i}"
    kernel = _per_axis(kernel, ndim, what + " kernel")
    stride = _per_axis(stride, ndim, what + " stride")
    dilation = _per_axis(dilation, ndim, what + " dilation")
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{what}: kernel, stride and dilation must be >= 1, got "
                         f"{kernel}, {stride}, {dilation}")
    return kernel, stride, _parse_padding(padding, ndim, what), dilation


def _infer_ndim(layers) -> int:
    for layer in layers:
        items = ([layer.get("kernel"), layer.get("stride")] if isinstance(layer, Mapping)
                 else list(layer[:2]))
        for item in items:
            if np.ndim(item) == 1:
                return len(item)
    return 3


def output_mapping(layers: Sequence, *, input_shape: Sequence[int] | None = None,
                   center: str = "rf", ndim: int | None = None) -> OutputMapping:
    """Index mapping of a layer stack by receptive-field arithmetic.

    Per axis, with J the stride so far, R the receptive field and ``start`` the first
    input voxel seen by cell 0, a layer (kernel k, stride s, dilation d, low padding p)
    gives ``start -= p * J``, ``R += (d * (k - 1)) * J``, ``J *= s``.

    Args:
      layers: per layer (convolution or pooling, in order), ``(kernel, stride, padding)``
        or ``(kernel, stride, padding, dilation)`` or a dict with those keys; kernel,
        stride, dilation an int or one int per axis (z, y, x); padding "VALID", "SAME",
        an int or one int per axis (symmetric), or one (lo, hi) pair per axis.
        Element-wise layers (activations, 1x1x1 convolutions) may be left out.
      input_shape: spatial input size (z, y, x). Needed only when a "SAME" layer with
        stride > 1 pads differently depending on the size (XLA pads SAME by
        ``total // 2`` low, ``total = max((ceil(n/s) - 1) * s + k - n, 0)``).
      center: "rf": a cell speaks for the centre of its receptive field
        (``start + (R - 1) / 2``); "patch": for the centre voxel of a training patch of the
        receptive-field size under the store's convention ``start + R // 2`` (the voxel
        the label of a patch-trained network refers to; differs by 0.5 for even R).
      ndim: number of spatial axes when no layer gives per-axis values (default 3).

    Returns:
      :class:`OutputMapping`.

    Raises:
      ValueError: malformed layers, or a size-dependent "SAME" layer without input_shape.
    """
    if center not in ("rf", "patch"):
        raise ValueError(f"center must be 'rf' or 'patch', got {center!r}")
    nd = ndim or (len(input_shape) if input_shape is not None else _infer_ndim(layers))
    start, rf, jump = [0] * nd, [1] * nd, [1] * nd
    size = None if input_shape is None else list(_per_axis(input_shape, nd, "input_shape"))
    for i, layer in enumerate(layers):
        kernel, stride, padding, dilation = _parse_layer(layer, nd, i)
        for a in range(nd):
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            s = stride[a]
            if padding == "SAME":
                if size is not None:
                    lo, hi = _same_pad(size[a], k_eff, s)
                else:
                    los = {max(k_eff - (s if r == 0 else r), 0) // 2 for r in range(s)}
                    if len(los) > 1:
                        raise ValueError(
                            f"layer {i}: 'SAME' padding with kernel {kernel[a]} and stride {s} "
                            f"pads by {sorted(los)} voxels depending on the input size; "
                            "pass input_shape")
                    lo, hi = los.pop(), None
            else:
                lo, hi = padding[a]
            start[a] -= lo * jump[a]
            rf[a] += (k_eff - 1) * jump[a]
            jump[a] *= s
            if size is not None:
                size[a] = (-(-size[a] // s) if padding == "SAME"
                           else (size[a] + lo + hi - k_eff) // s + 1)
                if size[a] < 1:
                    raise ValueError(f"layer {i}: input_shape {tuple(input_shape)} is smaller "
                                     f"than the receptive field along axis {a}")
    half = [(r - 1) / 2 if center == "rf" else r // 2 for r in rf]
    return OutputMapping(tuple(jump), tuple(st + h for st, h in zip(start, half)), tuple(rf),
                         tuple(start))


def output_shape(layers: Sequence, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of a layer stack (same layer format as :func:`output_mapping`)."""
    nd = len(input_shape)
    size = list(_per_axis(input_shape, nd, "input_shape"))
    for i, layer in enumerate(layers):
        kernel, stride, padding, dilation = _parse_layer(layer, nd, i)
        for a in range(nd):
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            if padding == "SAME":
                size[a] = -(-size[a] // stride[a])
            else:
                lo, hi = padding[a]
                size[a] = (size[a] + lo + hi - k_eff) // stride[a] + 1
            if size[a] < 1:
                raise ValueError(f"layer {i}: input_shape {tuple(input_shape)} leaves no output "
                                 f"along axis {a}")
    return tuple(size)


# ---------------------------------------------------------------------------
# Whole-volume scoring.
# ---------------------------------------------------------------------------


def foreground_probability(logits_fn: Callable, channel: int = 1) -> Callable:
    """Wraps a network returning (B, ..., C) class logits into one returning the softmax
    probability of class ``channel``, (B, ...) float32: the score :func:`score_volume`
    and the detector expect."""

    def fn(x):
        return jax.nn.softmax(logits_fn(x).astype(np.float32), axis=-1)[..., channel]

    return fn


def _check_output(shape: tuple, nd: int) -> None:
    if len(shape) < nd + 1:
        raise ValueError(f"apply_fn returned shape {tuple(shape)}; expected (B, {nd} spatial "
                         "axes[, per-cell axes...])")


def plan_axis_tiles(cells: int, extent: int, stride: int, need_lo: int, need_hi: int,
                    max_tile: int | None) -> list[tuple[int, int, int, int]]:
    """Tiles of one axis, sized to the volume: the fewest the tile cap allows, each as
    small as they can be.

    Cell ``c`` of the output grid reads input voxels ``[stride*c + need_lo,
    stride*c + need_hi)`` clipped to ``[0, extent)`` (its receptive field, or its block plus
    a halo). With ``max_tile`` the axis gets ``n = ceil(cells / (max_tile // stride))``
    tiles, and the smallest input window ``W`` (a multiple of ``stride``) for which ``n``
    windows cover every cell's needs: windows overlap by just the context the cells at
    their seams need, so a 300-voxel axis with cap 128 runs 3 windows of ~100 + halo
    rather than 3 of 128 + halo. Every window has the same width (one compilation) and
    lies inside ``[0, extent)``, so a window at the volume's edge sees the same border as
    one pass does (what makes padded, "SAME", networks tile exactly); a window starts at a
    multiple of ``stride`` so its cell grid lines up with the whole volume's.

    Args:
      cells: output cells along the axis (>= 1).
      extent: input voxels along the axis (the padded volume).
      stride: input voxels between neighbouring cells (the alignment of windows).
      need_lo, need_hi: the input a cell reads, relative to ``stride * c``; ``need_lo`` is
        rounded down to a multiple of ``stride``.
      max_tile: the most input voxels of cells (core, without context) per tile; None:
        one window over the whole axis.

    Returns:
      per tile ``(cell_lo, cell_hi, in_lo, in_hi)``: the tile owns cells
      ``[cell_lo, cell_hi)`` (tiles partition ``[0, cells)``) and reads input voxels
      ``[in_lo, in_hi)``; its output cell ``k`` is cell ``in_lo // stride + k``.

    Raises:
      ValueError: non-positive sizes.
    """
    cells, extent, stride = int(cells), int(extent), int(stride)
    if cells < 1 or extent < 1 or stride < 1:
        raise ValueError(f"plan_axis_tiles: cells {cells}, extent {extent} and stride {stride} "
                         "must be >= 1")
    if max_tile is not None and int(max_tile) < 1:
        raise ValueError(f"tile size must be >= 1 voxel, got {max_tile}")
    n = 1 if max_tile is None else -(-cells // max(1, int(max_tile) // stride))
    if n <= 1:
        return [(0, cells, 0, extent)]
    need_lo = (int(need_lo) // stride) * stride
    need_hi = int(need_hi)

    def cover(width):
        tiles, c = [], 0
        while c < cells:
            lo = max(0, stride * c + need_lo)
            lo = min(lo, ((extent - width) // stride) * stride)
            hi = lo + width
            # Cells whose needs (clipped to the volume) end inside the window.
            c1 = cells if hi >= extent else min(cells, (hi - need_hi) // stride + 1)
            if c1 <= c or len(tiles) == n:
                return None
            tiles.append((c, c1, lo, hi))
            c = c1
        return tiles

    width = stride * -(-cells // n)
    while width < extent:
        tiles = cover(width)
        if tiles is not None:
            return tiles
        width += stride
    return [(0, cells, 0, extent)]


def score_volume(apply_fn: Callable, volume_zyx: np.ndarray, mapping: OutputMapping,
                 tile_zyx: Sequence[int] | int | None = None, batch: int = 1, *,
                 pad: bool = True, pad_value: float = 0.0, variables: Any = None,
                 input_zyx: Sequence[int] | None = None,
                 jit: bool = True) -> tuple[np.ndarray, OutputMapping]:
    """Scores a whole volume fully convolutionally, optionally tile by tile.

    With ``pad`` the volume is first padded with ``pad_value`` (0 = air after the store's
    windowing, what ``PatchStore.read_patch`` fills outside a scan with) so that the score
    cells cover every input voxel: cell 0 sits at voxel ``(-1, 0]`` and the last within half
    a stride of the last voxel. Tiles (:func:`plan_axis_tiles`: ``ceil(cells / (tile_zyx //
    stride))`` per axis, each as small as that count allows, all one shape) split the score
    grid into blocks; each is computed from its input block plus the halo its receptive
    field needs, so tiled and untiled results are identical: bit for bit for
    any network whose cells depend only on their receptive field (VALID padding, or SAME
    padding whose low pad does not depend on the input size) and whose arithmetic does
    not change with the input shape; to float rounding when it does (``impl="auto"`` in
    ``lungjax.models.layers`` may pick another convolution formulation per shape).

    Args:
      apply_fn: (B, D, H, W, 1) float32 -> (B, D', H', W', *per_cell) outputs, e.g.
        (B, D', H', W') probabilities or (B, D', H', W', anchors, 5) anchor outputs;
        pure and shape-polymorphic (it is jitted once per tile shape; pass the same
        function object for every scan so compilations are reused). With ``variables``
        it is called as ``apply_fn(variables, x)``, so parameters are arguments of the
        compiled function rather than constants folded into it.
      volume_zyx: (D, H, W) float volume (e.g. ``PatchStore.read_volume``).
      mapping: the network's :class:`OutputMapping` (with its receptive field).
      tile_zyx: most input voxels per tile core, halo excluded (int or per axis); bounds
        the peak memory of a pass. None scores in one pass.
      batch: tiles per call (tiles of the same shape are batched; a short last batch is
        padded by repetition so it reuses the compiled shape).
      pad: pad the volume as above; False scores it as given.
      pad_value: value of the padding.
      variables: optional first argument of ``apply_fn`` (e.g. flax variables).
      input_zyx: the only spatial input shape ``apply_fn`` accepts (e.g. a serialized
        function exported for one tile size); every tile then has exactly this shape, the
        volume being padded at its far end as needed. Needs a network without padding
        (``rf_start >= 0``) and replaces ``tile_zyx``.
      jit: wrap ``apply_fn`` in ``jax.jit``.

    Returns:
      scores: (D', H', W', *per_cell) numpy array of the network's output dtype.
      mapping: the mapping from these score cells to voxels of ``volume_zyx``.

    Raises:
      ValueError: bad shapes, a mapping without receptive field, or a network whose
        output does not match the mapping (too few cells for a tile).
    """
    vol = np.asarray(volume_zyx, np.float32)
    nd = mapping.ndim
    if vol.ndim != nd:
        raise ValueError(f"volume has shape {vol.shape}; the mapping has {nd} axes")
    if mapping.receptive_field_zyx is None and (pad or tile_zyx is not None):
        raise ValueError("score_volume needs mapping.receptive_field_zyx to pad or tile")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fn = jax.jit(apply_fn) if jit else apply_fn
    run = fn if variables is None else (lambda x: fn(variables, x))
    n = np.asarray(vol.shape)
    stride = np.asarray(mapping.stride_zyx)
    offset = np.asarray(mapping.offset_zyx)

    if pad:
        rf = np.asarray(mapping.receptive_field_zyx)
        start = np.asarray(mapping.rf_start_zyx)
        pad_lo = np.maximum(0, np.ceil(offset - 1e-9)).astype(int)
        first = offset - pad_lo  # cell 0 in unpadded voxels, in (-1, 0] when offset > 0
        m = np.maximum(1, np.ceil((n - 1 - stride / 2 - first) / stride - 1e-9).astype(int) + 1)
        n_pad = np.maximum(n + pad_lo, start + stride * (m - 1) + rf)
        # A whole number of strides: tiles then line up with the volume's far edge too.
        n_pad = -(-n_pad // stride) * stride
        vol = np.pad(vol, [(int(a), int(b)) for a, b in zip(pad_lo, n_pad - n - pad_lo)],
                     constant_values=np.float32(pad_value))
    else:
        pad_lo = np.zeros(nd, int)
        n_pad = n
        m = None
    if input_zyx is not None:
        fixed = np.asarray(_per_axis(input_zyx, nd, "input_zyx"))
        if not pad or min(mapping.rf_start_zyx) < 0:
            raise ValueError("a fixed input shape needs pad=True and a network without padding "
                             f"(rf_start_zyx >= 0), got {mapping}")
        start = np.asarray(mapping.rf_start_zyx)
        per = (fixed - start - np.asarray(mapping.receptive_field_zyx)) // stride + 1
        if np.any(per < 1):
            raise ValueError(f"input_zyx {tuple(fixed)} is smaller than the receptive field "
                             f"{mapping.receptive_field_zyx} (+ start {tuple(start)})")
        count = -(-m // per)
        reach = stride * per * (count - 1) + fixed  # end of the last tile's input
        extra = np.maximum(reach - n_pad, 0)
        vol = np.pad(vol, [(0, int(e)) for e in extra], constant_values=np.float32(pad_value))
        probe = tuple(int(f) for f in fixed)
    else:
        probe = vol.shape
    try:
        full = jax.eval_shape(run, jax.ShapeDtypeStruct((1, *probe, 1), np.float32))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        # A function that cannot be traced (e.g. returns numpy): probe one fixed-size tile
        # for real, or learn the output from the first tile.
        if input_zyx is not None:
            full = np.asarray(run(np.zeros((1, *probe, 1), np.float32)))
        elif m is None and tile_zyx is not None:
            raise ValueError("apply_fn cannot be traced (it returns numpy?); tiling it "
                             "needs pad=True or input_zyx") from None
        else:
            full = None
    if full is not None:
        _check_output(full.shape, nd)
        full_cells = np.asarray(full.shape[1:nd + 1])
        if m is None:
            m = full_cells
        elif input_zyx is None and np.any(full_cells < m):
            raise ValueError(f"the network gives {tuple(full_cells)} cells on a padded volume "
                             f"of {tuple(vol.shape)}, the mapping {mapping} expects at least "
                             f"{tuple(m)}")
    if input_zyx is not None:
        axes = [[(int(c0), int(min(c0 + per[a], m[a])), int(stride[a] * c0),
                  int(stride[a] * c0 + fixed[a])) for c0 in range(0, int(m[a]), int(per[a]))]
                for a in range(nd)]
    elif tile_zyx is not None:
        tile = _per_axis(tile_zyx, nd, "tile_zyx")
        rf = mapping.receptive_field_zyx
        start = mapping.rf_start_zyx
        axes = [plan_axis_tiles(int(m[a]), int(n_pad[a]), int(stride[a]), start[a],
                                start[a] + rf[a], tile[a]) for a in range(nd)]
    else:
        axes = [[(0, None if m is None else int(m[a]), 0, int(n_pad[a]))] for a in range(nd)]

    tiles = list(itertools.product(*axes))
    groups: dict[tuple, list] = {}
    for t in tiles:
        groups.setdefault(tuple(hi - lo for _, _, lo, hi in t), []).append(t)
    out = None
    for shape, members in groups.items():
        for i in range(0, len(members), batch):
            chunk = members[i:i + batch]
            x = np.stack([vol[tuple(slice(lo, hi) for _, _, lo, hi in t)] for t in chunk])
            if len(chunk) < batch and len(members) > batch:
                x = np.concatenate([x, np.repeat(x[-1:], batch - len(chunk), 0)])
            y = np.asarray(run(x[..., None]))
            if out is None:
                _check_output(y.shape, nd)
                if m is None:  # one untiled pass of an untraceable function, no padding
                    m = np.asarray(y.shape[1:nd + 1])
                    tiles = [tuple((0, int(m[a]), 0, n_pad[a]) for a in range(nd))]
                    chunk = tiles
                out = np.empty(tuple(int(v) for v in m) + tuple(y.shape[nd + 1:]), y.dtype)
            for b, t in enumerate(chunk):
                src, dst = [], []
                for a, (c0, c1, lo, _) in enumerate(t):
                    k0 = c0 - lo // int(stride[a])
                    if k0 + (c1 - c0) > y.shape[1 + a]:
                        raise ValueError(
                            f"tile of input shape {shape} gave {y.shape[1:nd + 1]} cells; "
                            f"needed cells up to {k0 + c1 - c0} along axis {a}: the mapping "
                            f"{mapping} does not match the network")
                    src.append(slice(k0, k0 + c1 - c0))
                    dst.append(slice(c0, c1))
                out[tuple(dst)] = y[b][tuple(src)]
    return out, mapping.shifted(-pad_lo)


# ---------------------------------------------------------------------------
# Candidates.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Screening candidates of one scan.

    Attributes:
      cells: (K, 3) int64 score-volume cells (z, y, x).
      voxel_zyx: (K, 3) float64 voxel coordinates in the scored volume's grid.
      world_xyz: (K, 3) float64 world (x, y, z) mm.
      score: (K,) float64, highest first.
    """

    cells: np.ndarray
    voxel_zyx: np.ndarray
    world_xyz: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def select(self, index) -> "Candidates":
        """The candidates at ``index`` (bool mask or int indices), order kept."""
        return Candidates(self.cells[index], self.voxel_zyx[index], self.world_xyz[index],
                          self.score[index])


def inside_mask(mask: np.ndarray, points_zyx: np.ndarray) -> np.ndarray:
    """(K,) bool: whether each point's nearest voxel (clipped into the volume) is set in
    ``mask`` ((D, H, W), e.g. a lung mask). ``points_zyx``: (K, 3) voxel coordinates."""
    mask = np.asarray(mask)
    v = np.rint(np.asarray(points_zyx, np.float64)).astype(np.int64).reshape(-1, 3)
    v = np.clip(v, 0, np.asarray(mask.shape) - 1)
    return mask[tuple(v.T)] > 0


def mask_at_cells(mask: np.ndarray, mapping: OutputMapping,
                  cells_shape: Sequence[int]) -> np.ndarray:
    """(D', H', W') bool: ``mask`` ((D, H, W), e.g. a lung mask) at the input voxel each
    output cell speaks for (nearest voxel, clipped into the volume)."""
    mask = np.asarray(mask)
    # Cell k of every axis at once: voxel (z, y, x) of the diagonal cell (k, k, k).
    diagonal = np.arange(max(cells_shape))[:, None].repeat(len(cells_shape), axis=1)
    voxels = np.rint(mapping.cells_to_voxels(diagonal))
    index = [np.clip(voxels[:n, a], 0, mask.shape[a] - 1).astype(np.int64)
             for a, n in enumerate(cells_shape)]
    return mask[np.ix_(*index)] > 0


def nms_radius_cells(radius_mm: float, mapping: OutputMapping,
                     spacing_zyx: Sequence[float]) -> np.ndarray:
    """(3,) suppression radius in score cells for a radius in mm on a grid of this spacing."""
    if not radius_mm >= 0:
        raise ValueError(f"radius must be >= 0 mm, got {radius_mm}")
    return float(radius_mm) / mapping.cell_size_mm(spacing_zyx)


def refine_peaks(weights: np.ndarray, cells: np.ndarray, radius_cells) -> np.ndarray:
    """Sub-cell peak positions: the weighted centroid of the cells within an ellipsoid
    around each peak.

    A network trained on positives shifted anywhere within the nodule radius (Dou et al.'s
    augmentation) scores a plateau over the whole nodule, and the plateau's maximum can sit
    at its rim; on a stride-2 score grid the cell itself is up to a cell off. The centroid
    of the plateau around the peak is the nodule's centre.

    Args:
      weights: (D, H, W) non-negative float weights (e.g. probability above the
        threshold, 0 elsewhere).
      cells: (K, 3) int peak cells.
      radius_cells: scalar or (3,) ellipsoid radius in cells (0 on an axis: that axis is
        not refined).

    Returns:
      (K, 3) float64 cell coordinates; a peak whose neighbourhood has no weight stays put.
    """
    cells = np.asarray(cells, np.int64).reshape(-1, 3)
    r = np.broadcast_to(np.asarray(radius_cells, np.float64), (3,))
    span = np.floor(r + 1e-9).astype(np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in span], indexing="ij"),
                    -1).reshape(-1, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(r > 0, grid / np.where(r > 0, r, 1.0), 0.0)
    grid = grid[(q ** 2).sum(1) <= 1.0 + 1e-9]
    out = cells.astype(np.float64)
    shape = np.asarray(weights.shape)
    for i, c in enumerate(cells):
        nb = c + grid
        nb = nb[np.all((nb >= 0) & (nb < shape), 1)]
        w = np.asarray(weights[tuple(nb.T)], np.float64)
        if w.sum() > 0:
            out[i] = (nb * w[:, None]).sum(0) / w.sum()
    return out


def candidates_from_scores(scores: np.ndarray, mapping: OutputMapping, geometry: Geometry, *,
                           threshold: float, nms_radius_mm: float,
                           max_candidates: int | None = None,
                           shape_zyx: Sequence[int] | None = None,
                           refine_radius_mm: float = 0.0,
                           refine_weights: np.ndarray | None = None) -> Candidates:
    """Threshold + 3D NMS on a score volume, peaks mapped to voxels and world mm.

    Args:
      scores: (D', H', W') float score volume (``score_volume``'s first output).
      mapping: cells -> voxels of the grid ``geometry`` describes (``score_volume``'s
        second output).
      geometry: that grid's placement (``ScanRecord.geometry`` for a stored scan).
      threshold: minimum score (dou2017: 0.85).
      nms_radius_mm: no two candidates closer than this (mm, Euclidean).
      max_candidates: keep the highest this many; None keeps all.
      shape_zyx: the scored volume's shape; when given, voxel coordinates are clipped into
        it (padding can put a border cell up to half a stride outside).
      refine_radius_mm: > 0: each peak's position is the weighted centroid of the cells
        within this radius (:func:`refine_peaks`); ``cells`` stay the integer peaks.
      refine_weights: (D', H', W') weights for the refinement; default the scores above
        the threshold (``scores - threshold`` clipped at 0).

    Returns:
      :class:`Candidates`, highest score first.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (D, H, W), got shape {scores.shape}; reduce the "
                         "channel axis first (e.g. with foreground_probability)")
    radius = nms_radius_cells(nms_radius_mm, mapping, geometry.spacing_zyx)
    cells, values = peaks_3d(scores, threshold, radius, max_peaks=max_candidates)
    at = cells
    if refine_radius_mm > 0 and len(cells):
        w = (np.clip(scores.astype(np.float64) - threshold, 0, None) if refine_weights is None
             else refine_weights)
        at = refine_peaks(w, cells, nms_radius_cells(refine_radius_mm, mapping,
                                                    geometry.spacing_zyx))
    voxels = mapping.cells_to_voxels(at)
    if shape_zyx is not None:
        voxels = np.clip(voxels, 0, np.asarray(shape_zyx, np.float64) - 1)
    return Candidates(cells, voxels.reshape(-1, 3), voxel_to_world(voxels, geometry).reshape(-1, 3),
                      values.astype(np.float64))


def crop_patch(volume: np.ndarray, center_zyx, size_zyx) -> np.ndarray:
    """``PatchStore.read_patch`` on an in-memory volume: the (size) float32 box starting at
    ``center - size // 2`` of a (D, H, W) volume, outside filled with 0 (air after
    windowing)."""
    size = np.asarray(size_zyx, np.int64)
    start = np.asarray(center_zyx, np.int64) - size // 2
    shape = np.asarray(volume.shape)
    lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
    out = np.zeros(tuple(size), np.float32)
    if np.all(hi > lo):
        a, b = lo - start, hi - start
        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


def axial_disc_diameter_mm(mask: np.ndarray, spacing_zyx) -> float:
    """The diameter (mm) of a disc of a (D, H, W) bool mask's largest axial area."""
    area = np.asarray(mask).reshape(mask.shape[0], -1).sum(1).max() if mask.size else 0
    return float(2.0 * np.sqrt(area * float(spacing_zyx[1]) * float(spacing_zyx[2]) / np.pi))


# A component's score (``nodule_components``): its peak probability, its mean
# probability, or its expected volume V = sum of probabilities x voxel volume, as
# V / (V + NODULE_SCORE_HALF_MM3) (a 5 mm ball's volume scores 0.5).
NODULE_SCORES = ("peak", "mean", "volume")
NODULE_SCORE_HALF_MM3 = float(np.pi / 6 * 5.0 ** 3)


def nodule_components(prob: np.ndarray, spacing_zyx, *, threshold: float = 0.5,
                      min_voxels: int = 1, max_nodules: int = 100, score: str = "peak"):
    """Nodules of a probability volume: connected components (26-neighbourhood) of
    ``prob >= threshold`` with at least ``min_voxels`` voxels, the ``max_nodules`` of
    highest ``score`` (``NODULE_SCORES``: a segmenter's peak probability saturates near 1
    on most components, which leaves a FROC little to rank by).

    Args:
      prob: (D, H, W) float probability; spacing_zyx: its voxel size (mm).
      score: "peak" | "mean" | "volume" (``NODULE_SCORES``).

    Returns:
      (mask (D, H, W) uint8 of the kept components, centres (K, 3) float64 voxel
      centroids, score (K,) float64 in [0, 1], diameter_mm (K,) float64 the diameter of a
      disc of the component's largest axial area), ordered by score.
    """
    from scipy import ndimage

    if score not in NODULE_SCORES:
        raise ValueError(f"nodule score {score!r}: one of {', '.join(NODULE_SCORES)}")
    fg = prob >= threshold
    labels, n = ndimage.label(fg, np.ones((3, 3, 3), bool))
    if n == 0:
        return (np.zeros(prob.shape, np.uint8), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    idx = np.arange(1, n + 1)
    size = ndimage.sum_labels(fg, labels, idx)
    if score == "peak":
        value = ndimage.maximum(prob, labels, idx)
    else:
        mass = ndimage.sum_labels(prob.astype(np.float64), labels, idx)
        if score == "mean":
            value = mass / size
        else:
            volume = mass * float(np.prod(np.asarray(spacing_zyx, np.float64)))
            value = volume / (volume + NODULE_SCORE_HALF_MM3)
    keep = idx[size >= min_voxels]
    keep = keep[np.argsort(-value[keep - 1], kind="stable")][:max_nodules]
    centres = np.asarray(ndimage.center_of_mass(fg, labels, keep), np.float64).reshape(-1, 3)
    boxes = ndimage.find_objects(labels)
    diam = [axial_disc_diameter_mm(labels[boxes[lab - 1]] == lab, spacing_zyx) for lab in keep]
    mask = np.isin(labels, keep).astype(np.uint8)
    return mask, centres, np.asarray(value[keep - 1], np.float64), np.asarray(diam, np.float64)
