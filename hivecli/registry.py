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
from hivecli.datasets import load_digits, load_image_dataset
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
    if section.name in ("cifar10", "mnist", "imagefolder"):  # through torchvision, from section.root
        images = load_image_dataset(section.name, section.root, section.image_size, section.channels, section.normalize)
        return DatasetInfo(images.train, images.test, images.input_shape, images.num_classes)
    raise ConfigError(
        f"data.name = {section.name!r} is not a known dataset; choose one of digits, mnist, cifar10, "
        f"imagefolder, or write module:function"
    )


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
