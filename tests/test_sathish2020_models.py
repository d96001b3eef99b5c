"""Sathish et al. 2020 networks: exact parameter counts, the paper counter's FLOPs, shapes,
and max-pool indices / unpooling on literal arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.models import flops
from lungjax.models import sathish2020 as s
from lungjax.registry import MODELS

PAPER = (1, 512, 512, 1)  # one 512x512 slice


@pytest.mark.parametrize("name,model,shape,params", [
    ("sathish2020_unet", s.UNet(), (1, 32, 32, 1), 34_525_954),
    ("sathish2020_r2unet", s.R2UNet(), (1, 32, 32, 1), 39_091_330),
    ("sathish2020_sumnet", s.SUMNet(), (1, 32, 32, 1), 23_863_336),
    ("sathish2020_turing", s.TuringDiscriminator(), (1, 512, 512, 2), 1_133_696),
    ("sathish2020_lenet", s.LeNet(), (1, 64, 64, 1), 50_162),
])
def test_trainable_parameter_counts(name, model, shape, params):
    assert type(model) is MODELS.get(name)
    assert flops.count_params(model, shape) == params


def test_sumnet_with_its_discriminator_has_the_papers_total():
    total = (flops.count_params(s.SUMNet(), (1, 32, 32, 1))
             + flops.count_params(s.TuringDiscriminator(), (1, 512, 512, 2)))
    assert total == 24_997_032


@pytest.mark.parametrize("model,shape,repeat,expected", [
    (s.UNet(), PAPER, None, 261_901_254_656),
    (s.R2UNet(), PAPER, None, 612_076_355_584),
    (s.SUMNet(), PAPER, None, 114_237_112_320),
    # the paper's counter charged the VGG encoder twice (two hooks on each module)
    (s.SUMNet(), PAPER, {"encoder": 2}, 153_538_789_376),
    (s.LeNet(), (1, 64, 64, 1), None, 2_796_448),
])
def test_flops_by_the_papers_counting_rules(model, shape, repeat, expected):
    assert flops.count_flops(model, shape, repeat=repeat) == expected


def test_papers_parameter_figures_are_the_true_counts_summed_in_float32():
    for model, paper in ((s.UNet(), 34_525_952), (s.R2UNet(), 39_091_328)):
        per_layer = [c.params for c in flops.layer_costs(model, (1, 32, 32, 1))]
        assert flops.float32_sum(per_layer) == paper != sum(per_layer)


def test_flop_rules_on_one_small_network():
    # conv 3x3 1->4 with bias on 8x8 (SAME): 64*4*(9+1); BN: 4*64*4; Dense 4->3: 3*(2*4)
    import flax.linen as nn

    from lungjax.models.layers import BatchNorm, Conv

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = BatchNorm(use_running_average=True)(Conv(4, (3, 3))(x))
            x = s.LeakyReLU()(x)
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    costs = flops.layer_costs(Net(), (1, 8, 8, 1))
    assert [c.flops for c in costs] == [2560, 1024, 256, 24]
    assert [c.params for c in costs] == [40, 8, 0, 15]


def test_max_pool_indices_and_unpooling_on_a_literal_array():
    x = jnp.array([[1., 5., 2., 2.],
                   [3., 4., 0., 1.],
                   [7., 7., 0., 9.],
                   [7., 6., 8., 0.]])[None, :, :, None]
    values, idx = s.max_pool_with_indices(x)
    np.testing.assert_array_equal(values[0, ..., 0], [[5., 2.], [7., 9.]])
    # window offsets dy * 2 + dx; ties (2, 2 and 7, 7, 7) -> the first in row-major order
    np.testing.assert_array_equal(idx[0, ..., 0], [[1, 0], [0, 1]])
    up = s.max_unpool(jnp.array([[10., 20.], [30., 40.]])[None, :, :, None], idx)
    np.testing.assert_array_equal(up[0, ..., 0], [[0., 10., 20., 0.],
                                                  [0., 0., 0., 0.],
                                                  [30., 0., 0., 40.],
                                                  [0., 0., 0., 0.]])
    # the gradient of the pooled values reaches the chosen maximum only
    g = jax.grad(lambda v: jnp.sum(s.max_pool_with_indices(v)[0]))(x)
    np.testing.assert_array_equal(g[0, ..., 0], [[0., 1., 1., 0.],
                                                 [0., 0., 0., 0.],
                                                 [1., 0., 0., 1.],
                                                 [0., 0., 0., 0.]])


def test_unpooling_keeps_channels_and_batch_apart():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 4, 6, 3), dtype=np.float32))
    values, idx = s.max_pool_with_indices(x)
    up = s.max_unpool(values, idx)
    assert up.shape == x.shape
    # every window keeps exactly its maximum in place and zeros elsewhere
    np.testing.assert_array_equal(np.asarray(up)[np.asarray(up) > 0],
                                  np.asarray(x)[np.asarray(up) > 0])
    assert int(np.sum(np.asarray(up) > 0)) == values.size


@pytest.mark.parametrize("model,shape,out", [
    (s.SUMNet(features=8), (2, 32, 32, 1), (2, 32, 32, 2)),
    (s.UNet(features=8), (2, 16, 16, 1), (2, 16, 16, 2)),
    (s.R2UNet(features=8), (2, 16, 16, 1), (2, 16, 16, 2)),
    (s.TuringDiscriminator(features=4, pools=(2, 2, 1, 1), final_kernel=3),
     (2, 64, 64, 2), (2, 2)),
    (s.LeNet(), (2, 64, 64, 1), (2, 2)),
])
def test_output_shapes(model, shape, out):
    # Traced, not compiled (five networks' compilations would dominate the file): the
    # numerics are exercised by the tiny method's training in test_sathish2020.py.
    x = jnp.zeros(shape)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    v = jax.eval_shape(model.init, rngs, x)
    y = jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                                rngs={"dropout": jax.random.PRNGKey(2)},
                                                mutable=["batch_stats"])[0], v, x)
    assert y.shape == out and y.dtype == jnp.float32


def test_discriminator_rejects_a_slice_too_small_for_its_pools():
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(s.TuringDiscriminator().init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 128, 128, 2)))
