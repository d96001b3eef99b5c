"""Parameter and FLOP counts of a Flax module, by the rules of the PyTorch ``thop`` counter
(2019) that published papers quote, so their figures can be checked.

The model is traced once under ``jax.eval_shape`` (nothing is computed) with every module
call intercepted (``flax.linen.intercept_methods``); each call of a module's
``__call__`` is charged by its type from the input and output shapes:

==================================  ==================================================
module                              FLOPs
==================================  ==================================================
``Conv`` (lungjax.models.layers,    output elements x (C_in * prod(kernel) + 1 if bias)
flax.linen)
``BatchNorm`` (both)                4 x input elements
``flax.linen.Dense``                output elements x (2 * in - 1 + 1 if bias)
a module with ``FLOPS_PER_ELEMENT`` that many x input elements (LeakyReLU: 1)
anything else                       0 (ReLU, pooling, up-sampling, unpooling, dropout
                                    are functions here, as they cost 0 in ``thop``)
==================================  ==================================================

A module called several times is charged at every call (R2U-Net's recurrent
convolution: t + 1 times). Counts are exact Python integers at the given input shape
(batch included: give batch 1 for per-image figures).

``repeat`` reproduces a counter artefact: ``{"encoder": 2}`` charges every module under
the top-level submodule ``encoder`` twice, as ``thop`` did for SUMNet, whose VGG
encoder modules were registered under two parents and so carried two counting hooks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models import layers

__all__ = ["LayerCost", "count_flops", "count_params", "float32_sum", "layer_costs"]

_CONVS = (layers.Conv, nn.Conv)
_NORMS = (layers.BatchNorm, nn.BatchNorm)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One charged module call: its path ("encoder/conv1"), type name, FLOPs and the
    trainable parameters it owns (0 on its second and later calls)."""

    path: str
    kind: str
    flops: int
    params: int


def _size(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _rule(module: nn.Module, x_shape, y_shape) -> int:
    """FLOPs of one call of a module with a rule (``_has_rule``)."""
    if isinstance(module, _CONVS):
        k = _size(module.kernel_size)
        return _size(y_shape) * (int(x_shape[-1]) * k + (1 if module.use_bias else 0))
    if isinstance(module, _NORMS):
        return 4 * _size(x_shape)
    if isinstance(module, nn.Dense):
        n_in = int(x_shape[-1])
        return _size(y_shape) * (2 * n_in - 1 + (1 if module.use_bias else 0))
    return int(type(module).FLOPS_PER_ELEMENT) * _size(x_shape)


def _has_rule(module: nn.Module) -> bool:
    return (isinstance(module, _CONVS + _NORMS + (nn.Dense,))
            or getattr(type(module), "FLOPS_PER_ELEMENT", None) is not None)


def _own_params(variables: Mapping[str, Any], path: tuple[str, ...]) -> int:
    """Parameters stored directly at ``path`` (leaves of the module's own dict, not of
    its submodules)."""
    node = variables.get("params", {})
    for p in path:
        node = node.get(p, {}) if isinstance(node, Mapping) else {}
    if not isinstance(node, Mapping):
        return 0
    return sum(_size(v.shape) for v in node.values() if not isinstance(v, Mapping))


def layer_costs(model: nn.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
                repeat: Mapping[str, int] | None = None, **call_kwargs) -> list[LayerCost]:
    """Every charged module call of ``model.apply(variables, x, **call_kwargs)`` in call
    order, for ``x`` of ``input_shape`` (channels-last, batch first).

    Args:
      model: a Flax module.
      input_shape: e.g. (1, 512, 512, 1).
      dtype: of the traced input.
      repeat: top-level submodule name -> how many times its calls are charged.
      call_kwargs: passed to the call (default ``train=False`` where the module takes it).

    Returns:
      A list of :class:`LayerCost` (modules without a rule are left out).
    """
    repeat = dict(repeat or {})
    x = jax.ShapeDtypeStruct(tuple(int(s) for s in input_shape), dtype)
    kwargs = {"train": False, **call_kwargs}
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    variables = jax.eval_shape(lambda v: model.init(rngs, v, **kwargs), x)
    costs: list[LayerCost] = []
    seen: set[tuple[str, ...]] = set()

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name != "__call__" or not args:
            return out
        module = context.module
        if not _has_rule(module):  # containers return tuples (SUMNet's encoder)
            return out
        flops = _rule(module, args[0].shape, out.shape)
        path = tuple(module.scope.path)
        params = 0 if path in seen else _own_params(variables, path)
        seen.add(path)
        times = repeat.get(path[0], 1) if path else 1
        costs.append(LayerCost("/".join(path), type(module).__name__, flops * times, params))
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **kwargs)

    jax.eval_shape(run, variables, x)
    return costs


def count_flops(model: nn.Module, input_shape: Sequence[int], **kwargs) -> int:
    """Total FLOPs of one call at ``input_shape`` (see :func:`layer_costs`)."""
    return sum(c.flops for c in layer_costs(model, input_shape, **kwargs))


def count_params(model: nn.Module, input_shape: Sequence[int], **call_kwargs) -> int:
    """Trainable parameters ("params" collection; batch-norm statistics excluded)."""
    x = jax.ShapeDtypeStruct(tuple(int(s) for s in input_shape), jnp.float32)
    kwargs = {"train": False, **call_kwargs}
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    variables = jax.eval_shape(lambda v: model.init(rngs, v, **kwargs), x)
    return sum(_size(v.shape) for v in jax.tree_util.tree_leaves(variables["params"]))


def float32_sum(values: Sequence[int]) -> int:
    """``values`` accumulated left to right in float32, as ``thop`` summed per-module
    counts held in float32 tensors: above 2**24 the running sum keeps only multiples of
    a power of two, so a total may come out a few units off the true integer."""
    total = np.float32(0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return int(total)
