"""Datamodules: bundled digits, torchvision files written by the tests, analytic priors."""

import os

import pytest
import torch

from datamodules import AnalyticDataModule, DigitsDataModule, TorchvisionDataModule
from datamodules.analytic import sample_prior
from datamodules.base import ObserveBatch
from lightning_mlmc.errors import InputError
from lightning_mlmc.problems import AnalyticSpec
from tests.analytic_cases import EXAMPLES
from tests.torchvision_files import write_cifar10, write_mnist

SUPERRES = {"name": "superres", "factor": 2, "noise_std": 0.05}


def test_digits_are_scaled_split_by_seed_and_disjoint():
    dm = DigitsDataModule(SUPERRES, seed=0)
    train, val, test = dm.split("train"), dm.split("val"), dm.split("test")
    assert train.shape[1:] == (1, 8, 8) and len(train) + len(val) + len(test) == 1797
    assert (len(val), len(test)) == (180, 180)
    full = torch.cat([train, val, test])
    assert full.min() == -1.0 and full.max() == 1.0
    # Disjoint: no validation image appears in the training split (digits has a few exact duplicates,
    # so compare the split indices through a second module instead of pixel values).
    again = DigitsDataModule(SUPERRES, seed=0)
    assert torch.equal(again.split("val"), val)
    other = DigitsDataModule(SUPERRES, seed=1)
    assert not torch.equal(other.split("val"), val)


def test_training_observations_are_fresh_each_epoch_and_validation_ones_fixed():
    dm = DigitsDataModule(SUPERRES, seed=0, batch_size=32)
    items = [(x,) for x in dm.split("train")[:32]]
    collate = ObserveBatch(dm.operator)
    (x1, y1), (x2, y2) = collate(items), collate(items)
    assert torch.equal(x1, x2) and not torch.equal(y1, y2)
    # Both are A(x) + 0.05 eta: the residual has std 0.05 (4-sigma band of the std estimate, n = 512).
    resid = (y1 - dm.operator.apply(x1)).flatten()
    n = resid.numel()
    assert abs(float(resid.std()) - 0.05) < 4 * 0.05 / (2 * n) ** 0.5
    xa, ya = dm.validation_observations()
    xb, yb = DigitsDataModule(SUPERRES, seed=0).validation_observations()
    assert xa.shape == (16, 1, 8, 8) and ya.shape == (16, 1, 4, 4)
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch[1][:16], ya)


def test_operator_that_does_not_fit_the_data_is_a_clear_error():
    with pytest.raises(InputError, match="factor: 3 does not divide the image size 8x8"):
        DigitsDataModule({"name": "superres", "factor": 3})
    with pytest.raises(InputError, match=r"data.operator.shape: \[1, 28, 28\] does not match .*\[1, 8, 8\]"):
        DigitsDataModule({**SUPERRES, "shape": [1, 28, 28]})
    with pytest.raises(InputError, match="unknown operator 'blur'"):
        DigitsDataModule({"name": "blur"})


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_formats_load_from_files(tmp_path, dataset, folder):
    train, test = write_mnist(tmp_path, folder, n_train=64, n_test=16)
    dm = TorchvisionDataModule(SUPERRES, dataset=dataset, root=str(tmp_path), val_size=8, batch_size=16)
    x_train, x_val, x_test = dm.split("train"), dm.split("val"), dm.split("test")
    assert x_train.shape == (56, 1, 28, 28) and x_val.shape == (8, 1, 28, 28)
    torch.testing.assert_close(x_test, torch.as_tensor(test, dtype=torch.float32)[:, None] / 127.5 - 1)
    # Train + val are exactly the training file's images, rescaled.
    recon = torch.cat([x_train, x_val]).flatten(1)
    expected = torch.as_tensor(train, dtype=torch.float32).flatten(1) / 127.5 - 1
    assert sorted(map(tuple, recon.tolist())) == sorted(map(tuple, expected.tolist()))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16, 1, 14, 14)


def test_torchvision_cifar10_loads_from_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    train = write_cifar10(tmp_path, n_per_batch=8)
    # torchvision checks the official files' md5 sums; our test files differ by construction, so the
    # check is reduced to "the file exists".
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    dm = TorchvisionDataModule({"name": "inpaint", "mask": "box"}, dataset="cifar10", root=str(tmp_path),
                               val_size=4)
    assert dm.split("train").shape == (36, 3, 32, 32) and dm.split("test").shape == (8, 3, 32, 32)
    all_train = torch.cat([dm.split("train"), dm.split("val")])
    assert torch.isclose(all_train.sum(), torch.as_tensor(train, dtype=torch.float32).div(127.5).sub(1).sum())
    assert dm.operator.cond_channels == 4


def test_torchvision_without_files_names_the_folder_and_the_bundled_alternative(tmp_path):
    dm = TorchvisionDataModule(SUPERRES, dataset="mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(InputError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "nowhere" in msg and "download" in msg and "DigitsDataModule" in msg
    assert "\n" not in msg


def test_unknown_torchvision_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="data.dataset: unknown dataset 'svhn'"):
        TorchvisionDataModule(SUPERRES, dataset="svhn", root=str(tmp_path))


def test_analytic_prior_draws_have_the_mixtures_moments():
    spec = AnalyticSpec.load(os.path.join(EXAMPLES, "bimodal2d.json"))
    n = 40000
    x = sample_prior(spec, n, torch.Generator().manual_seed(0)).double().reshape(n, -1)
    w, mu, cov = (torch.as_tensor(v) for v in (spec.weights, spec.means, spec.covs))
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None] * (mu**2 + torch.diagonal(cov, dim1=1, dim2=2))).sum(0)
    var = second - mean**2
    # 5 standard errors of a sample mean.
    assert torch.all((x.mean(0) - mean).abs() < 5 * (var / n).sqrt())
    dm = AnalyticDataModule(os.path.join(EXAMPLES, "bimodal2d.json"), num_train=100, num_val=10, num_test=10)
    assert dm.operator.config()["name"] == "matrix" and dm.split("train").shape == (100, *spec.shape)
