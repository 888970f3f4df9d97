"""cifar10, mnist and imagefolder read through torchvision's own dataset classes from files this module
writes in the real on-disk formats, and trained on with `hive start`.

The tests that need torchvision run in CI's .venv-vision (torch 2.14.1 + torchvision 0.29.1); in the
main venv (no torchvision) they are skipped, and the ones that check the errors without torchvision
run. No test reaches beyond 127.0.0.1: where torchvision would download, every HTTP(S) request goes
to a proxy on a closed loopback port, which is what offline looks like.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from test_cli_train import HIVE, LOOPBACK

from hivecli import ConfigError
from hivecli.datasets import fetch_command, import_torchvision, load_image_dataset, load_torchvision_dataset
from hivecli.recipe import load_recipe
from hivecli.registry import load_dataset, quickstart_cnn

VISION_VENV = "runs in CI's .venv-vision (torch 2.14.1 + torchvision 0.29.1)"
CIFAR_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def has_torchvision() -> bool:
    try:
        import_torchvision()
    except ConfigError:
        return False
    return True


def needs_torchvision() -> Any:
    return pytest.importorskip("torchvision", reason=VISION_VENV)


# ---- the real formats ------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as in the real CIFAR-10 batches, which
    Python 2's cPickle wrote with protocol 2: unpickled with encoding="bytes" (the dataset page's recipe)
    their keys are b"data", b"labels"; with encoding="latin1" (torchvision's) they are "data", "labels"."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, data: bytes) -> None:
        size = len(data)
        header = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<I", size)
        self.write(header + data)
        self.memoize(data)

    dispatch[bytes] = _save_python2_str


def _pickle_python2(path: Path, value: dict[bytes, Any]) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(value)


def write_cifar10(root: Path, per_batch: int = 16, n_test: int = 16, seed: int = 0) -> Path:
    """ROOT/cifar-10-batches-py as in cifar-10-python.tar.gz: five training batches, a test batch and
    batches.meta; images are uint8 rows of 3072 (1024 red, 1024 green, 1024 blue), labels 0-9."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CIFAR_FILES[:6]):
        count = per_batch if name != "test_batch" else n_test
        label = f"training batch {index + 1} of 5" if name != "test_batch" else "testing batch 1 of 1"
        _pickle_python2(
            folder / name,
            {
                b"batch_label": label.encode(),
                b"labels": [int(x) for x in rng.integers(0, 10, count)],
                b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                b"filenames": [f"image_{index}_{i}.png".encode() for i in range(count)],
            },
        )
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_LABELS], b"num_vis": 3072}
    _pickle_python2(folder / "batches.meta", meta)
    return folder


def write_mnist(root: Path, n_train: int = 64, n_test: int = 16, gz: bool = False, seed: int = 0) -> Path:
    """ROOT/MNIST/raw with the four idx files: magic 2051 (images: count, 28, 28) and 2049 (labels:
    count), big-endian int32 headers, then unsigned bytes; gzipped as published if `gz`."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = struct.pack(">4i", 2051, count, 28, 28) + rng.integers(0, 256, count * 28 * 28, np.uint8).tobytes()
        labels = struct.pack(">2i", 2049, count) + rng.integers(0, 10, count, np.uint8).tobytes()
        for name, content in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (folder / name).write_bytes(content)
    return folder


def write_image_folder(folder: Path, classes: dict[str, int], seed: int = 0) -> None:
    """FOLDER/CLASS/*.png|jpg: small images of varying sizes and modes (RGB, gray, RGBA, palette)."""
    image = pytest.importorskip("PIL.Image", reason=VISION_VENV)
    rng = random.Random(seed)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            size = (rng.randint(12, 48), rng.randint(12, 48))
            mode = rng.choice(["RGB", "L", "RGBA", "P"])
            picture = image.new(mode, size, color=rng.randint(0, 255) if mode in ("L", "P") else None)
            if mode != "P":
                picture = image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))
            extension = "jpg" if mode in ("RGB", "L") and i % 2 else "png"
            picture.save(folder / name / f"{i}.{extension}")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without HIVE_* variables (they would change the test's recipe), plus `extra`."""
    return {**{key: value for key, value in os.environ.items() if not key.startswith("HIVE_")}, **extra}


def data_section(name: str, root: Path, *settings: str) -> Any:
    return load_recipe(None, [f"data.name={name}", f"data.root={json.dumps(str(root))}", *settings], env={}).data


# ---- without torchvision ---------------------------------------------------------------------------


def test_the_cifar10_writer_writes_what_the_dataset_page_describes(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the unpickle() of the CIFAR-10 page
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (16, 3072) and len(batch[b"labels"]) == 16
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"] == CIFAR_LABELS  # how torchvision reads it
    header = (write_mnist(tmp_path) / "train-images-idx3-ubyte").read_bytes()[:16]
    assert struct.unpack(">4i", header) == (2051, 64, 28, 28)


def test_missing_torchvision_is_one_config_error_naming_the_extra_and_the_pairing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    minor = int(torch.__version__.split(".")[1])
    write_cifar10(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_dataset(data_section("cifar10", tmp_path))
    message = str(raised.value)
    assert "needs torchvision" in message and "pip install 'hivecli[vision]'" in message
    assert f"'torchvision==0.{minor + 15}.*'" in message and "pairs with torch 2.(N-15)" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"pip install 'hivecli\[vision\]'"):
        load_dataset(data_section("imagefolder", tmp_path))


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_files_without_torchvision_name_the_folder_the_layout_and_the_fetch_command(
    tmp_path, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError) as raised:
        load_dataset(data_section(name, tmp_path / "data"))
    message = str(raised.value)
    folder = tmp_path / "data" / ("cifar-10-batches-py" if name == "cifar10" else "MNIST/raw")
    assert str(folder) in message and fetch_command(name, tmp_path / "data") in message
    assert ("data_batch_1..5" if name == "cifar10" else "train-images-idx3-ubyte") in message
    assert "pip install 'hivecli[vision]'" in message and "\n" not in message


def test_the_fetch_command_is_torchvisions_own_download():
    assert fetch_command("cifar10", "/data/x") == (
        "python -c \"import torchvision; torchvision.datasets.CIFAR10('/data/x', download=True)\""
    )
    assert "torchvision.datasets.MNIST('/data/x', download=True)" in fetch_command("mnist", "/data/x")


@pytest.fixture
def offline(monkeypatch) -> dict[str, str]:
    """Every HTTP(S) request of urllib (torchvision's downloads) goes to a closed port on 127.0.0.1, here and
    in subprocesses given the returned environment; and in this process, nothing but 127.0.0.1 is dialled."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed once the probe is: connection refused
    env = {key: value for key, value in clean_env().items() if key.lower() not in ("no_proxy", "all_proxy")}
    env.update(http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    for key in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(key, proxy)
    dial = socket.create_connection

    def loopback_only(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        assert address[0] in ("127.0.0.1", "localhost"), f"a test tried to reach {address}"
        return dial(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    return env


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_hive_start_with_missing_files_offline_prints_one_line_and_exits_2(tmp_path, offline, name):
    root = tmp_path / "data"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"[data]\nname = {name!r}\nroot = {json.dumps(str(root))}\n[limits]\nmax_steps = 2\n")
    out = ["--set", f"output.dir={json.dumps(str(tmp_path / 'runs'))}"]
    result = subprocess.run(
        [*HIVE, "start", str(recipe), *LOOPBACK, "--json", *out],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=offline,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    # the peer's addresses, then one line: the error (torchvision's "Downloading ..." lines are not shown)
    errors = [line for line in result.stderr.splitlines() if line.startswith("hive: error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Downloading" not in result.stderr
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "MNIST/raw")
    assert str(folder) in result.stderr and fetch_command(name, root) in result.stderr
    # with torchvision it tried to download (into the closed proxy); without, it says to install it
    assert ("downloading it failed" if has_torchvision() else "pip install 'hivecli[vision]'") in result.stderr
    for line in result.stdout.splitlines():  # --json: torchvision's "Downloading ..." lines are not on stdout
        json.loads(line)


# ---- with torchvision --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_files_offline_are_a_config_error_after_the_download_failed(tmp_path, offline, name):
    needs_torchvision()
    with pytest.raises(ConfigError) as raised:
        load_torchvision_dataset(name, str(tmp_path), train=True)
    message = str(raised.value)
    assert message.startswith(f"{'CIFAR-10' if name == 'cifar10' else 'MNIST'} is not in data.root = {tmp_path}")
    assert "downloading it failed" in message and fetch_command(name, tmp_path) in message and "\n" not in message


def test_cifar10_is_read_by_torchvision_in_its_own_format(tmp_path):
    torchvision = needs_torchvision()
    write_cifar10(tmp_path)
    info = load_dataset(data_section("cifar10", tmp_path))
    assert isinstance(info.train, torchvision.datasets.CIFAR10) and isinstance(info.test, torchvision.datasets.CIFAR10)
    assert (len(info.train), len(info.test), info.input_shape, info.num_classes) == (80, 16, (3, 32, 32), 10)
    image, label = info.train[0]
    assert image.dtype == torch.float32 and -1 <= image.min() < image.max() <= 1 and 0 <= label < 10
    assert info.train.classes == CIFAR_LABELS  # from batches.meta
    gray = load_dataset(data_section("cifar10", tmp_path, "data.channels=1", "data.image_size=16"))
    assert gray.input_shape == (1, 16, 16) and gray.train[0][0].shape == (1, 16, 16)


def test_mnist_is_read_from_idx_files_and_from_gz(tmp_path):
    torchvision = needs_torchvision()
    write_mnist(tmp_path / "plain")
    info = load_dataset(data_section("mnist", tmp_path / "plain"))
    assert isinstance(info.train, torchvision.datasets.MNIST) and info.train.train and not info.test.train
    assert (len(info.train), len(info.test), info.input_shape, info.num_classes) == (64, 16, (1, 28, 28), 10)
    packed = write_mnist(tmp_path / "packed", gz=True)
    three = load_image_dataset("mnist", str(tmp_path / "packed"), image_size=32, channels=3, normalize="none")
    assert three.input_shape == (3, 32, 32) and three.train[0][0].min() >= 0 and three.train[0][0].max() <= 1
    assert all((packed / name).is_file() for name in MNIST_FILES)  # unpacked next to the .gz, as torchvision does
    assert torch.equal(three.train.data, info.train.data)  # same seed, same pixels
    with pytest.raises(ConfigError, match=r'^data.normalize = "imagenet" needs 3 channels'):
        load_dataset(data_section("mnist", tmp_path / "plain", "data.normalize=imagenet"))


def test_unreadable_files_are_a_config_error_naming_the_folder(tmp_path):
    needs_torchvision()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in CIFAR_FILES:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=rf"^{folder} does not hold a readable CIFAR-10 .*download=True"):
        load_torchvision_dataset("cifar10", str(tmp_path), train=True)


def test_image_folder_with_train_and_val_takes_the_train_classes(tmp_path):
    torchvision = needs_torchvision()
    write_image_folder(tmp_path / "train", {"cat": 6, "dog": 5, "emu": 5})
    write_image_folder(tmp_path / "val", {"cat": 2, "emu": 2}, seed=1)  # no dog: labels still follow train
    info = load_dataset(data_section("imagefolder", tmp_path))
    assert isinstance(info.train, torchvision.datasets.ImageFolder) and info.train.classes == ["cat", "dog", "emu"]
    assert (len(info.train), len(info.test), info.input_shape, info.num_classes) == (16, 4, (3, 32, 32), 3)
    assert sorted(label for _, label in info.test) == [0, 0, 2, 2]
    write_image_folder(tmp_path / "test", {"yak": 1})  # val wins over test
    assert len(load_dataset(data_section("imagefolder", tmp_path)).test) == 4
    write_image_folder(tmp_path / "val", {"yak": 1}, seed=2)
    with pytest.raises(ConfigError, match=r"has classes that .*train lacks \(yak\)"):
        load_dataset(data_section("imagefolder", tmp_path))


def test_image_folder_without_splits_is_split_80_20_the_same_way_every_time(tmp_path):
    needs_torchvision()
    write_image_folder(tmp_path, {"a": 10, "b": 10})
    first = load_dataset(data_section("imagefolder", tmp_path, "data.image_size=20", "data.channels=1"))
    again = load_dataset(data_section("imagefolder", tmp_path))
    assert (len(first.train), len(first.test), first.input_shape, first.num_classes) == (16, 4, (1, 20, 20), 2)
    assert first.test.indices == again.test.indices and again.input_shape == (3, 32, 32)
    with pytest.raises(ConfigError, match=r"^imagefolder: no images in .*data.root should hold ROOT/train/CLASS"):
        load_dataset(data_section("imagefolder", tmp_path / "a"))  # images, but no class folders


# ---- training with `hive start` ------------------------------------------------------------------------


def train(tmp_path: Path, name: str, root: Path, *settings: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`hive start` a few steps of a tiny run on `root`; the finished event and the metrics rows."""
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(
        f'[run]\nprefix = "vision-{name}"\n[model]\nname = "quickstart-cnn"\n'
        f"[data]\nname = {name!r}\nroot = {json.dumps(str(root))}\nbatch_size = 8\n"
        f'[optimizer]\nname = "sgd"\nlr = 0.01\n'
        f"[averaging]\nmin_matchmaking_time = 0.5\nrequest_timeout = 0.2\n"
        f"[limits]\nmax_steps = 6\n"
        f"[output]\ndir = {json.dumps(str(tmp_path / 'runs'))}\neval_every_steps = 3\ncheckpoint_every_steps = 3\n"
        f"report_every_seconds = 0.2\n"
    )
    sets = [arg for value in settings for arg in ("--set", value)]
    result = subprocess.run(
        [*HIVE, "start", str(recipe), *LOOPBACK, "--json", *sets], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finished = next(event for event in events if event["event"] == "finished")
    run_dir = Path(finished["checkpoint"]).parent.parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return finished, rows


def check_trained(finished: dict[str, Any], rows: list[dict[str, Any]], shape: tuple[int, ...], classes: int) -> None:
    assert finished["reason"] == "max_steps" and finished["step"] == 6
    losses = [row["loss"] for row in rows if row.get("loss") is not None]
    assert losses and all(math.isfinite(loss) for loss in losses)
    checkpoint = torch.load(finished["checkpoint"])
    assert checkpoint["step"] == 6
    # the model was built for the data: its first layer takes `shape`, its last gives `classes`
    quickstart_cnn(shape, classes).load_state_dict(checkpoint["model"])
    assert checkpoint["model"]["0.weight"].shape[1] == shape[0] and checkpoint["model"]["7.bias"].shape == (classes,)


def test_hive_start_trains_on_cifar10(tmp_path):
    needs_torchvision()
    write_cifar10(tmp_path / "data")
    finished, rows = train(tmp_path, "cifar10", tmp_path / "data")
    check_trained(finished, rows, (3, 32, 32), 10)
    assert finished["accuracy"] is not None  # on test_batch


def test_hive_start_trains_on_mnist_from_gz_files(tmp_path):
    needs_torchvision()
    write_mnist(tmp_path / "data", gz=True)
    finished, rows = train(tmp_path, "mnist", tmp_path / "data")
    check_trained(finished, rows, (1, 28, 28), 10)


def test_hive_start_trains_on_an_image_folder_of_varying_sizes(tmp_path):
    needs_torchvision()
    write_image_folder(tmp_path / "data" / "train", {"circle": 8, "square": 8, "star": 8, "wave": 8})
    write_image_folder(tmp_path / "data" / "test", {"circle": 2, "star": 2}, seed=1)
    finished, rows = train(tmp_path, "imagefolder", tmp_path / "data")
    check_trained(finished, rows, (3, 32, 32), 4)
    assert finished["accuracy"] is not None
    finished, rows = train(tmp_path, "imagefolder", tmp_path / "data", "data.image_size=24", "data.channels=1")
    check_trained(finished, rows, (1, 24, 24), 4)
