"""Write tiny datasets in the exact on-disk formats torchvision reads (no download needed)."""

import os
import pickle
import struct

import numpy as np


def _idx(path, array: np.ndarray) -> None:
    """IDX (SN3 PascalVincent) file: magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "i" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, folder="MNIST", n_train=64, n_test=16, seed=0):
    """MNIST/FashionMNIST raw files (``folder`` = MNIST or FashionMNIST) under root; returns the train images."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    _idx(os.path.join(raw, "train-images-idx3-ubyte"), train)
    _idx(os.path.join(raw, "train-labels-idx1-ubyte"), rng.integers(0, 10, n_train, dtype=np.uint8))
    _idx(os.path.join(raw, "t10k-images-idx3-ubyte"), test)
    _idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), rng.integers(0, 10, n_test, dtype=np.uint8))
    return train, test


def write_cifar10(root, n_per_batch=8, seed=0):
    """cifar-10-batches-py pickles (5 training batches, a test batch, the meta file); returns the train images."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n_per_batch))}, f)
        batches.append(data)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)
