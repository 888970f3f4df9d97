"""Wire codecs for averaged tensors: none, fp16, 8-bit uniform and 8-bit blockwise.

A codec turns a float32 chunk into (meta, bytes) and back. The encoded size depends only on
the number of elements, so a receiver can preallocate buffers for a whole part before the
first byte arrives and receive every chunk straight into place.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from hivecli._exceptions import ConfigError


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the tensor must outlive the view)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(flat.view(torch.uint8).numpy())  # via uint8: numpy has no bfloat16


class Codec(ABC):
    """Encodes float32 chunks for the wire. Subclasses document their error bound."""

    name: str

    @abstractmethod
    def encoded_nbytes(self, numel: int) -> int:
        """Bytes `encode` produces for `numel` elements."""

    @abstractmethod
    def encode(self, chunk: torch.Tensor) -> tuple[list[float], memoryview]:
        """Encode a 1-D float32 chunk into (msgpack-able meta, bytes)."""

    @abstractmethod
    def decode(self, meta: Any, data: memoryview, numel: int) -> torch.Tensor:
        """Decode what `encode` made; the result may share memory with `data`.

        Raises:
            ValueError: `meta` or `data` does not fit `numel` elements.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCompression(Codec):
    """Raw float32: exact, and zero-copy on both ends."""

    name = "none"

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, chunk: torch.Tensor) -> tuple[list[float], memoryview]:
        return [], tensor_bytes(chunk.to(torch.float32).contiguous())

    def decode(self, meta: Any, data: memoryview, numel: int) -> torch.Tensor:
        _check_size(data, self.encoded_nbytes(numel))
        return torch.frombuffer(_writable(data), dtype=torch.float32, count=numel)


class Float16Compression(Codec):
    """Half precision: relative error at most 2**-11 of each value, within fp16's range."""

    name = "fp16"

    def encoded_nbytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, chunk: torch.Tensor) -> tuple[list[float], memoryview]:
        limit = torch.finfo(torch.float16).max
        return [], tensor_bytes(chunk.clamp(-limit, limit).to(torch.float16))

    def decode(self, meta: Any, data: memoryview, numel: int) -> torch.Tensor:
        _check_size(data, self.encoded_nbytes(numel))
        return torch.frombuffer(_writable(data), dtype=torch.float16, count=numel).to(torch.float32)


class Uniform8BitQuantization(Codec):
    """One byte per value on a uniform grid between the chunk's min and max:
    absolute error at most (max - min) / 510."""

    name = "uniform8bit"

    def encoded_nbytes(self, numel: int) -> int:
        return numel

    def encode(self, chunk: torch.Tensor) -> tuple[list[float], memoryview]:
        chunk = chunk.to(torch.float32)
        low, high = (chunk.min().item(), chunk.max().item()) if chunk.numel() else (0.0, 0.0)
        scale = (high - low) / 255 or 1.0
        codes = chunk.sub(low).div_(scale).round_().clamp_(0, 255).to(torch.uint8)
        return [low, scale], tensor_bytes(codes)

    def decode(self, meta: Any, data: memoryview, numel: int) -> torch.Tensor:
        _check_size(data, self.encoded_nbytes(numel))
        low, scale = _floats(meta, 2)
        return torch.frombuffer(_writable(data), dtype=torch.uint8, count=numel).to(torch.float32).mul_(scale).add_(low)


class Blockwise8BitQuantization(Codec):
    """One signed byte per value, scaled by the absolute maximum of its block of 4096 values:
    absolute error at most absmax(block) / 254. Outliers spoil only their own block."""

    name = "blockwise8bit"
    block = 4096

    def encoded_nbytes(self, numel: int) -> int:
        return numel + 4 * math.ceil(numel / self.block)

    def encode(self, chunk: torch.Tensor) -> tuple[list[float], memoryview]:
        chunk = chunk.to(torch.float32)
        numel, blocks = chunk.numel(), math.ceil(chunk.numel() / self.block)
        padded = torch.nn.functional.pad(chunk, (0, blocks * self.block - numel)).view(blocks, self.block)
        scales = padded.abs().amax(dim=1).div_(127).clamp_(min=1e-30)
        codes = padded.div(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8).view(-1)[:numel]
        out = torch.empty(self.encoded_nbytes(numel), dtype=torch.uint8)
        out[: 4 * blocks].copy_(scales.view(torch.uint8))
        out[4 * blocks :].copy_(codes.view(torch.uint8))
        return [], tensor_bytes(out)

    def decode(self, meta: Any, data: memoryview, numel: int) -> torch.Tensor:
        _check_size(data, self.encoded_nbytes(numel))
        blocks = math.ceil(numel / self.block)
        raw = torch.frombuffer(_writable(data), dtype=torch.uint8)
        scales = raw[: 4 * blocks].view(torch.float32)
        codes = raw[4 * blocks :].view(torch.int8).to(torch.float32)
        padded = torch.nn.functional.pad(codes, (0, blocks * self.block - numel)).view(blocks, self.block)
        return padded.mul_(scales[:, None]).view(-1)[:numel]


CODECS: dict[str, type[Codec]] = {
    codec.name: codec
    for codec in (NoCompression, Float16Compression, Uniform8BitQuantization, Blockwise8BitQuantization)
}


class AutoCompression:
    """`compression="auto"`: each round's leader picks fp16 or none from the link rate its peer
    measured (link.LinkMeter), so that compression is used only where it saves more time on the
    wire than its conversions cost.

    Converting one element to fp16 and back costs 1/P seconds (P measured once, on the thread
    that averages) and saves 2 bytes, which take 2/R seconds on a link that moves R bytes/s: fp16
    pays iff R < 2P. Until a round has been measured: none. On a 2-core machine 2P is 0.4-0.9
    GB/s: loopback (about 1 GB/s) stays exact, 100 Mbit/s and 1 Gbit/s links compress.

    Not a codec itself: every member uses the codec the leader chose (RoundPlan.codec).
    """

    name = "auto"
    choices = ("none", "fp16")

    def __init__(self) -> None:
        self._pairs_per_second: float | None = None

    def pairs_per_second(self) -> float:
        """Elements this thread converts to fp16 and back per second (measured on first use)."""
        if self._pairs_per_second is None:
            codec, sample = Float16Compression(), torch.randn(1 << 20)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                meta, data = codec.encode(sample)
                codec.decode(meta, data, sample.numel())
                best = min(best, time.perf_counter() - start)
            self._pairs_per_second = sample.numel() / max(best, 1e-9)
        return self._pairs_per_second

    def choose(self, link_rate: float | None) -> str:
        """The codec for a round we lead, on a link of `link_rate` bytes/s (None: not measured)."""
        if link_rate is None:
            return "none"
        return "fp16" if link_rate < 2 * self.pairs_per_second() else "none"

    def conversion_seconds(self, codec: str, converted: int) -> float:
        """About how long a round spent encoding and decoding `converted` elements with `codec`."""
        return 0.0 if codec == "none" else converted / (2 * self.pairs_per_second())

    def __repr__(self) -> str:
        return "AutoCompression()"


def get_codec(compression: str | Codec | AutoCompression | None) -> Codec | AutoCompression:
    """A codec by name ("none", "fp16", "uniform8bit", "blockwise8bit") or instance, or "auto"
    (an AutoCompression, which picks none or fp16 for each round).

    Raises:
        ConfigError: an unknown name.
    """
    if compression is None:
        return NoCompression()
    if isinstance(compression, Codec | AutoCompression):
        return compression
    key = str(compression).lower().replace("-", "").replace("_", "")
    aliases = {"float16": "fp16", "uniform8": "uniform8bit", "blockwise8": "blockwise8bit", "8bit": "blockwise8bit"}
    key = aliases.get(key, key)
    if key == AutoCompression.name:
        return AutoCompression()
    if key not in CODECS:
        names = ", ".join([*CODECS, AutoCompression.name])
        raise ConfigError(f"compression = {compression!r} is not known; use one of: {names}")
    return CODECS[key]()


def _check_size(data: memoryview, expected: int) -> None:
    if data.nbytes != expected:
        raise ValueError(f"chunk of {data.nbytes} bytes, expected {expected}")


def _writable(data: memoryview) -> memoryview:
    # torch.frombuffer warns on read-only memory; wire buffers are writable, test bytes are not
    return memoryview(bytearray(data)) if data.readonly else data


def _floats(meta: Any, n: int) -> list[float]:
    if not isinstance(meta, list) or len(meta) != n or not all(isinstance(x, (int, float)) for x in meta):
        raise ValueError(f"codec metadata {str(meta)[:60]!r} is not {n} numbers")
    return [float(x) for x in meta]
