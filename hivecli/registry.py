"""Models and datasets a recipe names: a small built-in registry, or the user's `module:function`.

A dataset factory returns `DatasetInfo` (train and test sets, input shape, class count); a
model factory takes `(input_shape, num_classes)` and returns an `nn.Module`. User functions
follow the same contracts: `mypkg.data:load(root=...)` and `mypkg.models:build(shape, classes)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hivecli._exceptions import ConfigError
from hivecli.datasets import load_digits, load_torchvision_dataset
from hivecli.recipe import DataSection, ModelSection, is_user_code


@dataclass(frozen=True)
class DatasetInfo:
    train: Dataset[Any]
    test: Dataset[Any] | None
    input_shape: tuple[int, ...]
    num_classes: int


# ---- models ------------------------------------------------------------------------------------


def quickstart_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The quick-start's CNN; for 3 x 32 x 32 input it is exactly that model."""
    channels, height, width = _image_shape(input_shape, "quickstart-cnn", minimum=16)
    flat = 32 * (((height - 4) // 2 - 4) // 2) * (((width - 4) // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 16, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
        nn.Conv2d(16, 32, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, num_classes),
    )  # fmt: skip


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden_size: int = 128) -> nn.Module:
    size = 1
    for dim in input_shape:
        size *= dim
    return nn.Sequential(nn.Flatten(), nn.Linear(size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_classes))


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A ResNet of three residual stages (16, 32, 64 channels), about 0.2M parameters."""
    channels, _, _ = _image_shape(input_shape, "resnet-small", minimum=8)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )  # fmt: skip


def _image_shape(shape: tuple[int, ...], model: str, minimum: int) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape[1:]) < minimum:
        raise ConfigError(
            f"model {model} needs images of at least {minimum} x {minimum} pixels, but the dataset gives "
            f'{" x ".join(map(str, shape))}; set data.image_size = 32 (or choose model.name = "mlp")'
        )
    return shape[0], shape[1], shape[2]


MODELS: dict[str, Callable[..., nn.Module]] = {
    "quickstart-cnn": quickstart_cnn,
    "mlp": mlp,
    "resnet-small": resnet_small,
}


def build_model(section: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The recipe's model. Raises ConfigError for an unknown name or a shape it cannot take."""
    if is_user_code(section.name):
        model = load_user_function(section.name, "model.name")(input_shape, num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name = {section.name!r} returned a {type(model).__name__}, not a torch nn.Module")
        return model
    if section.name not in MODELS:
        raise ConfigError(
            f"model.name = {section.name!r} is not a known model; choose one of {', '.join(MODELS)} "
            f"or write module:function"
        )
    if section.name == "mlp":
        return mlp(input_shape, num_classes, section.hidden_size)
    return MODELS[section.name](input_shape, num_classes)


# ---- datasets ----------------------------------------------------------------------------------


def _torchvision_transform(section: DataSection, channels: int) -> Any:
    from torchvision import transforms

    steps: list[Any] = []
    if section.image_size:
        steps.append(transforms.Resize((section.image_size, section.image_size)))
    target = section.channels or channels
    if target != channels or target == 1:
        steps.append(transforms.Grayscale(num_output_channels=target))
    steps += [transforms.ToTensor(), transforms.Normalize((0.5,) * target, (0.5,) * target)]
    return transforms.Compose(steps)


def load_dataset(section: DataSection) -> DatasetInfo:
    """The recipe's dataset. Raises ConfigError for an unknown name, a failed download or a bad folder."""
    if is_user_code(section.name):
        info = load_user_function(section.name, "data.name")(root=section.root)
        if not isinstance(info, DatasetInfo):
            raise ConfigError(f"data.name = {section.name!r} must return hivecli.registry.DatasetInfo")
        return info
    if section.name == "digits":
        train, test = load_digits(image_size=section.image_size or 8, channels=section.channels or 1)
        return DatasetInfo(train, test, tuple(train.tensors[0].shape[1:]), 10)
    if section.name in ("cifar10", "mnist"):
        base_channels = 3 if section.name == "cifar10" else 1
        base_size = 32 if section.name == "cifar10" else 28
        if section.image_size or section.channels:
            transform = _torchvision_transform(section, base_channels)
            train = load_torchvision_dataset(section.name, section.root, True, transform)
            test = load_torchvision_dataset(section.name, section.root, False, transform)
        else:
            train = load_torchvision_dataset(section.name, section.root, True)
            test = load_torchvision_dataset(section.name, section.root, False)
        size = section.image_size or base_size
        return DatasetInfo(train, test, (section.channels or base_channels, size, size), 10)
    if section.name == "imagefolder":
        return _image_folder(section)
    raise ConfigError(
        f"data.name = {section.name!r} is not a known dataset; choose one of digits, mnist, cifar10, "
        f"imagefolder, or write module:function"
    )


def _image_folder(section: DataSection) -> DatasetInfo:
    from pathlib import Path

    from hivecli.datasets import import_torchvision

    torchvision = import_torchvision()
    root = Path(section.root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir():
        raise ConfigError(
            f"data.root = {section.root!r} is not a folder; point it at a folder with one subfolder per class"
        )
    size = section.image_size or 32
    transform = _torchvision_transform(section.model_copy(update={"image_size": size}), 3)
    train = torchvision.datasets.ImageFolder(str(train_dir), transform=transform)
    test = (
        torchvision.datasets.ImageFolder(str(root / "test"), transform=transform) if (root / "test").is_dir() else None
    )
    return DatasetInfo(train, test, (section.channels or 3, size, size), len(train.classes))


def load_user_function(reference: str, key: str) -> Callable[..., Any]:
    """Import `module:function`. Raises ConfigError naming the recipe key when it cannot."""
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{key} = {reference!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{key} = {reference!r}: module {module_name!r} has no function {function_name!r}")
    return function
