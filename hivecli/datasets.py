"""Datasets that training recipes and examples load by name.

`digits` is real data that works offline: the 1,797 handwritten 8x8 digits that ship with
scikit-learn. `cifar10`, `mnist` and `imagefolder` are read by torchvision's own dataset classes
(`CIFAR10`, `MNIST`, `ImageFolder`) from their standard layout on disk:

    cifar10      ROOT/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (the python version)
    mnist        ROOT/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                 t10k-labels-idx1-ubyte (each may be .gz: it is unpacked next to itself, as torchvision does)
    imagefolder  ROOT/train/CLASS/*.png|jpg and, to test on, ROOT/val/CLASS/... or ROOT/test/CLASS/...;
                 or ROOT/CLASS/*.png|jpg, split 80/20 with a fixed seed like `digits`

cifar10 and mnist are downloaded into ROOT only when their files are missing; when that fails
(offline), the ConfigError names the folder, the layout and the command that fetches them.
torchvision is an optional extra (`pip install 'hivecli[vision]'`) and is imported only here,
inside functions, so that the rest of hivecli never needs it.
"""

from __future__ import annotations

import contextlib
import gzip
import inspect
import io
import os
import pickle
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from hivecli._exceptions import ConfigError

_TEST_FRACTION = 0.2
_SPLIT_SEED = 1234  # every peer splits the same way, so test accuracy is comparable across peers

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# what can go wrong while torchvision reads files that are there: truncated, not the format, wrong shapes
_READ_ERRORS = (OSError, RuntimeError, ValueError, AssertionError, EOFError, KeyError, IndexError, zlib.error)
_READ_ERRORS += (pickle.UnpicklingError,)


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
    train, test = fixed_split(len(labels))
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def fixed_split(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of a dataset of `size` samples, 80/20: the same on every peer (a fixed
    seed), so that test accuracy is comparable across peers."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_test = int(size * _TEST_FRACTION)
    return order[n_test:], order[:n_test]


# ---- torchvision ----------------------------------------------------------------------------------


def torchvision_install_hint() -> str:
    """How to install the torchvision that pairs with the torch installed here."""
    version = torch.__version__.split("+")[0]
    major, minor = (int(part) for part in version.split(".")[:2])
    if major == 2:  # torchvision 0.N is built for torch 2.(N - 15): 0.16 for 2.1, ..., 0.29 for 2.14
        pin = f" 'torchvision==0.{minor + 15}.*'"
        pairing = f"the release built for this torch {version}; torchvision 0.N pairs with torch 2.(N-15)"
    else:
        pin, pairing = "", f"the release built for this torch {version} (see pytorch.org/get-started)"
    return f"install it with pip install 'hivecli[vision]'{pin} ({pairing})"


def import_torchvision(needed_for: str = "this dataset") -> Any:
    """torchvision, or a ConfigError that says which install works with this torch."""
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as e:  # missing, or built for another torch
        raise ConfigError(
            f"{needed_for} needs torchvision, which could not be imported ({_first_line(e)}); "
            f"{torchvision_install_hint()}, or use the offline dataset 'digits'"
        ) from None
    return torchvision


@dataclass(frozen=True)
class _Downloadable:
    """A torchvision dataset with a fixed layout under ROOT that torchvision can download."""

    title: str
    class_name: str  # in torchvision.datasets
    folder: tuple[str, ...]  # under ROOT
    files: tuple[str, ...]  # in ROOT/folder
    contents: str  # the files, for messages
    gzipped: bool  # each file may also be there as FILE.gz
    channels: int

    def directory(self, root: str | Path) -> Path:
        return Path(root).joinpath(*self.folder)

    def layout(self, root: str | Path) -> str:
        return f"{self.directory(root)} holding {self.contents}"

    def missing(self, root: str | Path) -> list[Path]:
        where = self.directory(root)
        return [
            where / name
            for name in self.files
            if not (where / name).is_file() and not (self.gzipped and (where / f"{name}.gz").is_file())
        ]

    def fetch_command(self, root: str | Path) -> str:
        return f'python -c "import torchvision; torchvision.datasets.{self.class_name}({str(root)!r}, download=True)"'


_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)  # fmt: skip
DOWNLOADABLE: dict[str, _Downloadable] = {
    "cifar10": _Downloadable(
        title="CIFAR-10",
        class_name="CIFAR10",
        folder=("cifar-10-batches-py",),
        files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
        contents="data_batch_1..5, test_batch and batches.meta (CIFAR-10's python version)",
        gzipped=False,
        channels=3,
    ),
    "mnist": _Downloadable(
        title="MNIST",
        class_name="MNIST",
        folder=("MNIST", "raw"),
        files=_MNIST_FILES,
        contents=f"the idx files {', '.join(_MNIST_FILES)} (each may be .gz)",
        gzipped=True,
        channels=1,
    ),
}


def fetch_command(name: str, root: str | Path) -> str:
    """The shell command that downloads dataset `name` ("cifar10" or "mnist") into `root`."""
    return DOWNLOADABLE[name].fetch_command(_absolute(root))


def image_transform(
    source_channels: int, channels: int | None = None, image_size: int | None = None, normalize: str = "symmetric"
) -> Any:
    """torchvision transform: PIL image -> float tensor, resized to image_size x image_size if given,
    converted to `channels`, and normalized ("symmetric": [0, 1] -> [-1, 1]; "imagenet": ImageNet's
    channel means and stds; "none": left in [0, 1]).

    Raises:
        ConfigError: torchvision is missing, or "imagenet" with one channel.
    """
    transforms = import_torchvision("an image transform").transforms
    target = channels or source_channels
    steps: list[Any] = []
    if image_size:
        steps.append(transforms.Resize((image_size, image_size)))
    if target != source_channels:
        steps.append(transforms.Grayscale(num_output_channels=target))
    steps.append(transforms.ToTensor())
    if normalize == "symmetric":
        steps.append(transforms.Normalize((0.5,) * target, (0.5,) * target))
    elif normalize == "imagenet":
        if target != 3:
            raise ConfigError(
                'data.normalize = "imagenet" needs 3 channels, but the images have 1; set data.channels = 3 '
                'or data.normalize = "symmetric"'
            )
        steps.append(transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD))
    elif normalize != "none":
        raise ConfigError(f"data.normalize = {normalize!r}: choose symmetric, imagenet or none")
    return transforms.Compose(steps)


def load_torchvision_dataset(name: str, root: str, train: bool, transform: Any = None) -> Dataset[Any]:
    """CIFAR-10 or MNIST through torchvision, from its standard layout under `root`; downloaded
    there first only if its files are missing. Without `transform`, images become tensors in [-1, 1].

    Raises:
        ConfigError: an unknown name, torchvision is missing, the files are missing and could not be
            downloaded (the message names the folder, the layout and the command that fetches them),
            or they are there but unreadable.
    """
    spec = _downloadable(name)
    root_path = _absolute(root)
    torchvision, missing = _prepare(name, root_path)
    if transform is None:
        transform = image_transform(spec.channels)
    dataset_class = _cifar10_class(torchvision) if name == "cifar10" else getattr(torchvision.datasets, spec.class_name)
    messages = io.StringIO()  # torchvision prints "Downloading ..." on stdout, which `hive --json` keeps for events
    try:
        with contextlib.redirect_stdout(messages):
            dataset = dataset_class(root=str(root_path), train=train, transform=transform, download=bool(missing))
    except _READ_ERRORS as e:
        if missing:
            raise ConfigError(
                f"{spec.title} is not in data.root = {root_path} (it looks for {spec.layout(root_path)}) and "
                f"downloading it failed ({_last_line(e)}); fetch it where there is internet with "
                f"`{spec.fetch_command(root_path)}` and copy the {'/'.join(spec.folder)} folder it writes to "
                f"{spec.directory(root_path)}, or point data.root at a copy"
            ) from None
        raise ConfigError(
            f"{spec.directory(root_path)} does not hold a readable {spec.title} ({_last_line(e)}); it should hold "
            f"{spec.contents}: delete it and fetch it again with `{spec.fetch_command(root_path)}`"
        ) from None
    if messages.getvalue():
        sys.stderr.write(messages.getvalue())
    _check_labels(dataset, spec.directory(root_path))
    return dataset


def _downloadable(name: str) -> _Downloadable:
    if name not in DOWNLOADABLE:
        choices = ", ".join(DOWNLOADABLE)
        raise ConfigError(f"dataset {name!r} is not one torchvision downloads here; choose one of {choices}")
    return DOWNLOADABLE[name]


def _prepare(name: str, root: Path) -> tuple[Any, list[Path]]:
    """torchvision and the files of dataset `name` that are missing under `root` (to download); .gz files
    unpacked. Without torchvision, the error says both what is missing and how to install it.

    Raises:
        ConfigError: torchvision is missing, or a .gz file could not be unpacked.
    """
    spec = DOWNLOADABLE[name]
    missing = spec.missing(root)
    if not missing:
        if spec.gzipped:
            _gunzip_missing(spec.directory(root), spec.files)
        return import_torchvision(f"data.name = {name!r}"), []
    try:
        return import_torchvision(), missing
    except ConfigError:
        raise ConfigError(
            f"{spec.title} is not in data.root = {root} (it looks for {spec.layout(root)}; {missing[0].name} is "
            f"missing), and torchvision, which downloads and reads it, could not be imported; "
            f"{torchvision_install_hint()}, then fetch it with `{spec.fetch_command(root)}`, or use the offline "
            f"dataset 'digits'"
        ) from None


def _cifar10_class(torchvision: Any) -> Any:
    base = torchvision.datasets.CIFAR10

    class CIFAR10Files(base):  # type: ignore[misc, valid-type]
        """torchvision's CIFAR10 that requires its files to be there, not to match the MD5 sums of the
        official release: a subset or a copy made by your own tools reads the same (a corrupted file still
        fails to unpickle). The download still checks the archive's MD5."""

        train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in base.train_list]
        test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in base.test_list]
        meta: ClassVar[dict[str, str | None]] = {**base.meta, "md5": None}

    return CIFAR10Files


def _gunzip_missing(directory: Path, files: tuple[str, ...]) -> None:
    """Unpack FILE.gz next to itself where FILE is missing, as torchvision's own download does."""
    for name in files:
        target, packed = directory / name, directory / f"{name}.gz"
        if target.is_file() or not packed.is_file():
            continue
        partial = directory / f".{name}.{os.getpid()}.partial"  # peers sharing a root never see half a file
        try:
            with gzip.open(packed, "rb") as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            os.replace(partial, target)
        except (OSError, EOFError, zlib.error) as e:
            partial.unlink(missing_ok=True)
            raise ConfigError(
                f"could not unpack {packed} into {target} ({_last_line(e)}); torchvision reads the unpacked idx "
                f"files: run `gunzip -k {packed}`, or make {directory} writable"
            ) from None


def _check_labels(dataset: Any, directory: Path) -> None:
    labels = torch.as_tensor(dataset.targets)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(dataset.classes)):
        raise ConfigError(
            f"{directory} has labels from {int(labels.min())} to {int(labels.max())}, but names "
            f"{len(dataset.classes)} classes; its files do not belong together"
        )


# ---- image folders -----------------------------------------------------------------------------------

IMAGE_FOLDER_LAYOUT = (
    "ROOT/train/CLASS/*.png|jpg (and, to test on, ROOT/val/CLASS/... or ROOT/test/CLASS/...), "
    "or ROOT/CLASS/*.png|jpg (split 80/20)"
)


class ImageData(NamedTuple):
    """What a recipe's dataset needs: the model is built for `input_shape` and `num_classes`."""

    train: Dataset[Any]
    test: Dataset[Any] | None
    input_shape: tuple[int, ...]
    num_classes: int


def load_image_folder(
    root: str, image_size: int = 32, channels: int | None = None, normalize: str = "symmetric"
) -> ImageData:
    """A folder of class folders of images through torchvision's ImageFolder, every image resized to
    image_size x image_size (so that images of any size stack into batches) and made RGB, or gray with
    channels = 1. ROOT/train (and ROOT/val, else ROOT/test, to test on) if there is a ROOT/train;
    otherwise ROOT itself, split 80/20 with a fixed seed. The classes are the train folder's subfolders,
    sorted by name; a test folder may lack some of them.

    Raises:
        ConfigError: torchvision is missing, ROOT is not such a folder, or a test folder names a
            class the train folder lacks.
    """
    root_path = _absolute(root)
    if not root_path.is_dir():
        raise ConfigError(f"imagefolder: {root_path} is not a folder; data.root should hold {IMAGE_FOLDER_LAYOUT}")
    torchvision = import_torchvision("data.name = 'imagefolder'")
    transform = image_transform(3, channels, image_size, normalize)
    train_dir = root_path / "train"
    if train_dir.is_dir():
        train = _image_folder(torchvision, train_dir, transform)
        test_dir = next((root_path / split for split in ("val", "test") if (root_path / split).is_dir()), None)
        test = _image_folder(torchvision, test_dir, transform, train.classes) if test_dir else None
    else:
        everything = _image_folder(torchvision, root_path, transform)
        train_indices, test_indices = fixed_split(len(everything))
        train = Subset(everything, train_indices.tolist())
        test = Subset(everything, test_indices.tolist()) if len(test_indices) else None
        train.classes = everything.classes  # type: ignore[attr-defined]
    return ImageData(train, test, tuple(train[0][0].shape), len(train.classes))  # type: ignore[attr-defined]


def _image_folder(torchvision: Any, directory: Path, transform: Any, classes: list[str] | None = None) -> Any:
    """ImageFolder(directory); with `classes` (a train folder's), labelled by those, whichever are there."""
    image_folder = torchvision.datasets.ImageFolder
    if classes is None:
        dataset_class, options = image_folder, {}
    else:
        found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise ConfigError(
                f"imagefolder: {directory} has classes that {directory.parent / 'train'} lacks "
                f"({', '.join(unknown)}); the train folder decides the classes"
            )

        class TrainClasses(image_folder):  # type: ignore[misc, valid-type]
            def find_classes(self, _directory: str) -> tuple[list[str], dict[str, int]]:
                return list(classes), {name: index for index, name in enumerate(classes)}

        dataset_class = TrainClasses
        # allow_empty (torchvision >= 0.18): a test folder may lack some classes
        options = {"allow_empty": True} if "allow_empty" in inspect.signature(image_folder).parameters else {}
    try:
        return dataset_class(str(directory), transform=transform, **options)
    except (OSError, ValueError) as e:  # FileNotFoundError: no class folders, or no images in them
        raise ConfigError(
            f"imagefolder: no images in {directory} ({_first_line(e).rstrip('.')}); data.root should hold "
            f"{IMAGE_FOLDER_LAYOUT}"
        ) from None


def load_image_dataset(
    name: str, root: str, image_size: int | None = None, channels: int | None = None, normalize: str = "symmetric"
) -> ImageData:
    """cifar10, mnist or imagefolder as train and test sets with their input shape and class count, taken from
    the data (a sample's shape after the transform, the dataset's classes).

    Raises:
        ConfigError: see load_torchvision_dataset and load_image_folder.
    """
    if name == "imagefolder":
        return load_image_folder(root, image_size or 32, channels, normalize)
    spec = _downloadable(name)
    _prepare(name, _absolute(root))  # before the transform: the error names missing files even without torchvision
    transform = image_transform(spec.channels, channels, image_size, normalize)
    train = load_torchvision_dataset(name, root, True, transform)
    test = load_torchvision_dataset(name, root, False, transform)
    return ImageData(train, test, tuple(train[0][0].shape), len(train.classes))  # type: ignore[attr-defined]


def _absolute(root: str | Path) -> Path:
    return Path(os.path.expanduser(root)).absolute()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _last_line(error: BaseException) -> str:
    """The cause: torchvision's MNIST download error ends with the last mirror's failure."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
