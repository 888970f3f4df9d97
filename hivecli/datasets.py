"""Datasets that training recipes and examples load by name.

`digits` is real data that works offline: the 1,797 handwritten 8x8 digits that ship with
scikit-learn. `cifar10` and `mnist` are downloaded by torchvision the first time, as in
PyTorch's tutorials; offline, they fail with a message that names the offline choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from hivecli._exceptions import ConfigError

_TEST_FRACTION = 0.2
_SPLIT_SEED = 1234  # every peer splits the same way, so test accuracy is comparable across peers


def load_digits(image_size: int = 8, channels: int = 1) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits as (train, test), 80/20 with a fixed split.

    Images are scaled to [-1, 1] and, if asked, resized to `image_size` and repeated to
    `channels`, so that models made for CIFAR-10 (3 x 32 x 32) take them as they are.

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ConfigError("the offline dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear")
    images = images.repeat(1, channels, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_test = int(len(labels) * _TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def import_torchvision() -> Any:
    """torchvision, or a ConfigError that says which install works with this torch."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as e:
        raise ConfigError(
            f"torchvision is needed for downloaded datasets and could not be imported ({e}); install the "
            f"release that matches torch {torch.__version__.split('+')[0]} (see pytorch.org/get-started), "
            f"or use the offline dataset 'digits'"
        ) from None
    return torchvision


def load_torchvision_dataset(name: str, root: str, train: bool, transform: Any = None) -> Dataset[Any]:
    """CIFAR-10 or MNIST from torchvision, normalized to [-1, 1], downloaded into `root` if needed.

    Raises:
        ConfigError: torchvision is missing, or the download failed (offline, blocked).
    """
    torchvision = import_torchvision()
    from torchvision import transforms

    classes = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}
    if name not in classes:
        raise ConfigError(f"dataset {name!r} is not one torchvision provides here; choose one of {sorted(classes)}")
    channels = 3 if name == "cifar10" else 1
    if transform is None:
        normalize = transforms.Normalize((0.5,) * channels, (0.5,) * channels)
        transform = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        return classes[name](root=root, train=train, download=True, transform=transform)
    except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"could not download {name} into {root!r} ({reason}); connect to the internet, put the files there "
            f"yourself, or use the offline dataset 'digits'"
        ) from None
