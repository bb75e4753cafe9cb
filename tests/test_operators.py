"""Inverse-problem operators: exact forward maps, observation noise, conditioning, configs, errors."""

import numpy as np
import pytest
import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.operators import (
    DenseMatrix,
    Denoising,
    Inpainting,
    SuperResolution,
    operator_from_config,
    upsample,
)
from tests.analytic_cases import inpaint4x4


def images(b=3, shape=(1, 8, 8), seed=0):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))


def test_superres_is_block_average_and_conditions_at_image_size():
    op = SuperResolution((2, 8, 8), factor=2, noise_std=0.0)
    x = images(shape=(2, 8, 8))
    y = op.observe(x)
    blocks = x.reshape(3, 2, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(y, blocks)
    assert op.observation_shape == (2, 4, 4) and op.cond_channels == 2
    cond = op.condition(y)
    assert cond.shape == x.shape
    torch.testing.assert_close(cond[:, :, ::2, ::2], y)  # nearest upsampling repeats every pixel
    torch.testing.assert_close(F_avg(cond), y)  # and pooling it back gives y exactly


def F_avg(x):
    return torch.nn.functional.avg_pool2d(x, 2)


def test_observation_noise_is_the_injected_generators_normal_draw():
    op = SuperResolution((1, 8, 8), factor=2, noise_std=0.3)
    x = images()
    y = op.observe(x, torch.Generator().manual_seed(5))
    eta = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(y, op.apply(x) + 0.3 * eta)
    torch.testing.assert_close(op.observe(x, torch.Generator().manual_seed(5)), y)  # reproducible


def test_inpainting_box_mask_zeroes_the_box_and_adds_the_mask_channel():
    op = Inpainting((1, 8, 8), mask="box", box=[2, 3, 4, 2], noise_std=0.1)
    x = images()
    y = op.observe(x, torch.Generator().manual_seed(0))
    assert torch.all(y[:, :, 2:6, 3:5] == 0)  # no signal and no noise inside the box
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 3:5] = False
    assert torch.all(y[:, 0][:, outside] != x[:, 0][:, outside])  # noisy where observed
    cond = op.condition(y)
    assert cond.shape == (3, 2, 8, 8)
    assert cond[:, 1].sum() == 3 * (64 - 8)
    assert torch.all(cond[:, 1, 2:6, 3:5] == 0)


def test_inpainting_random_mask_has_the_requested_fraction_and_is_fixed_by_seed():
    a = Inpainting((3, 8, 8), mask="random", missing_fraction=0.25, mask_seed=3)
    b = Inpainting((3, 8, 8), mask="random", missing_fraction=0.25, mask_seed=3)
    c = Inpainting((3, 8, 8), mask="random", missing_fraction=0.25, mask_seed=4)
    assert int((a.observed == 0).sum()) == 16
    assert torch.equal(a.observed, b.observed) and not torch.equal(a.observed, c.observed)
    x = images(shape=(3, 8, 8))
    assert torch.all(a.apply(x)[:, :, a.observed == 0] == 0)  # all channels share the mask


def test_denoising_is_identity_plus_noise():
    op = Denoising((1, 8, 8), noise_std=0.2)
    x = images()
    torch.testing.assert_close(op.apply(x), x)
    torch.testing.assert_close(op.condition(x), x)


def test_dense_matrix_matches_the_analytic_spec():
    spec = inpaint4x4()
    op = DenseMatrix(spec.shape, spec.matrix, spec.noise_std)
    x = torch.randn(5, *spec.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(op.apply(x).numpy(), x.reshape(5, -1).numpy() @ spec.matrix.T)
    y = op.apply(x)
    back = op.condition(y)  # images: A^T y in image shape
    np.testing.assert_allclose(back.reshape(5, -1).numpy(), y.numpy() @ spec.matrix)
    vec = DenseMatrix((spec.dim,), spec.matrix, spec.noise_std)
    assert vec.condition(y) is y and vec.cond_channels == spec.matrix.shape[0]


@pytest.mark.parametrize("op", [
    SuperResolution((1, 8, 8), factor=4, noise_std=0.05, upsample="bicubic"),
    Denoising((3, 4, 4), noise_std=0.5),
    Inpainting((1, 8, 8), mask="box", box=[0, 0, 3, 3]),
    Inpainting((1, 8, 8), mask="random", missing_fraction=0.6, mask_seed=9),
    DenseMatrix((4,), [[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]], 0.1),
])
def test_config_round_trip_gives_the_same_operator(op):
    back = operator_from_config(op.config())
    assert back.config() == op.config()
    x = images(shape=op.shape)
    torch.testing.assert_close(back.observe(x, torch.Generator().manual_seed(0)),
                               op.observe(x, torch.Generator().manual_seed(0)))


def test_bicubic_upsampling_keeps_constants():
    y = torch.full((1, 1, 4, 4), 0.7)
    torch.testing.assert_close(upsample(y, 2, "bicubic"), torch.full((1, 1, 8, 8), 0.7))


@pytest.mark.parametrize("make, field", [
    (lambda: SuperResolution((1, 8, 8), factor=3), "factor"),
    (lambda: SuperResolution((64,), factor=2), "shape"),
    (lambda: Inpainting((1, 8, 8), box=[6, 6, 4, 4]), "box"),
    (lambda: Inpainting((1, 8, 8), mask="random", missing_fraction=1.5), "missing_fraction"),
    (lambda: Inpainting((1, 8, 8), mask="circle"), "mask"),
    (lambda: Denoising((1, 8, 8), noise_std=0.0), "noise_std"),
    (lambda: Denoising((1, 8, 8), noise_std=-1), "noise_std"),
    (lambda: DenseMatrix((3,), [[1.0, 0.0]], 0.1), "matrix"),
    (lambda: operator_from_config({"name": "deblur"}), "operator"),
    (lambda: operator_from_config({"name": "superres", "shape": [1, 8, 8], "zoom": 2}), "operator"),
])
def test_bad_operator_parameters_name_the_field(make, field):
    with pytest.raises(InputError, match=field):
        make()


def test_shape_mismatch_between_operator_and_data_is_a_clear_error():
    op = SuperResolution((1, 8, 8), factor=2)
    with pytest.raises(InputError, match=r"shape: .*\[1, 8, 8\].*\[1, 28, 28\]"):
        op.observe(torch.zeros(2, 1, 28, 28))
    with pytest.raises(InputError, match="y: .*observations of shape"):
        op.condition(torch.zeros(2, 1, 8, 8))
