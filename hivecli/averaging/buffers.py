"""Where a round's encoded chunks are received: byte buffers kept between rounds, or shared
with the peer that writes them (sharedmem.py), each cut into one region per chunk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hivecli.averaging.compression import Codec, tensor_bytes
from hivecli.averaging.partition import Chunk
from hivecli.averaging.sharedmem import SHM, SharedBuffer, layout_tag


class BufferPool:
    """Byte buffers kept between rounds: fresh memory costs a page fault per 4 KiB, which
    for a large model takes longer than sending it over loopback."""

    def __init__(self) -> None:
        self._buffers: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes]

    def clear(self) -> None:
        self._buffers.clear()


class ChunkedBuffer:
    """Encoded bytes of a sequence of chunks, back to back, each addressable by index."""

    def __init__(
        self,
        pool: BufferPool,
        key: Any,
        chunks: Sequence[Chunk],
        codec: Codec,
        shared: Callable[[int], SharedBuffer | None] | None = None,
    ):
        self.chunks, self.codec = chunks, codec
        self.offsets = [0]
        for chunk in chunks:
            self.offsets.append(self.offsets[-1] + codec.encoded_nbytes(chunk.numel))
        self.layout = layout_tag(self.offsets)
        # in a buffer the other side maps and writes into (sharedmem.py), where `shared` gives one
        self.shared = shared(self.offsets[-1]) if shared is not None else None
        self.published = False  # in a region the other side published (`read_from`): only as SHM
        self.raw = self.shared.region(self.offsets[-1]) if self.shared is not None else pool.get(key, self.offsets[-1])
        self.view = tensor_bytes(self.raw) if self.offsets[-1] else memoryview(b"")
        self.metas: list[Any] = [None] * len(chunks)
        self.sunk: list[memoryview | None] = [None] * len(chunks)  # the views `sink` handed out

    def offer(self) -> list[str] | None:
        """What the peer that writes into our shared buffer needs to map it, if we have one."""
        return self.shared.offer(self.layout) if self.shared is not None else None

    def read_from(self, region: torch.Tensor) -> None:
        """Read every chunk from now on in `region` (bytes laid out as ours): a buffer the other
        side published its chunks in, which it writes before sending their messages."""
        self.raw, self.published = region, True
        self.view = tensor_bytes(region) if self.offsets[-1] else memoryview(b"")

    def region(self, index: int) -> memoryview:
        return self.view[self.offsets[index] : self.offsets[index + 1]]

    def sink(self, payload: Any, nbytes: int) -> memoryview | None:
        """Where the body of the chunk `payload` names goes: its region, once. A second body for
        the same chunk (a peer that sends it again, or more after the last) comes as bytes and
        fails `place`'s order check, without overwriting the checked chunk that may still be
        waiting to be averaged or copied."""
        valid = isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], int)
        if self.published or not (valid and 0 <= payload[0] < len(self.chunks)) or self.sunk[payload[0]] is not None:
            return None
        view = self.sunk[payload[0]] = self.region(payload[0])
        return view

    def place(self, expected: int, payload: Any, body: bytes | memoryview) -> torch.Tensor:
        """Check one received message, copy its body in place if the sink did not, and decode it.

        Raises:
            ValueError: out of order, wrong size, undecodable, or with a body where the chunk
                must be in a buffer the other side published (`read_from`).
        """
        written = (  # the other side wrote the body into our shared buffer, at its region (sharedmem.py)
            isinstance(payload, list)
            and len(payload) == 3
            and payload[2] == SHM
            and (self.shared is not None or self.published)
        )
        if written:
            payload = payload[:2]
        if not (isinstance(payload, list) and len(payload) == 2 and payload[0] == expected):
            raise ValueError(f"expected chunk {expected}, got {str(payload)[:60]!r}")
        region = self.region(expected)
        if self.published and not written:  # we never write into the other side's published buffer
            raise ValueError(f"chunk {expected} came with a body, not in the buffer its sender published")
        if written:
            if len(body):
                raise ValueError(f"chunk {expected} came both with a body and in our shared buffer")
            self.sunk[expected] = region  # no later body of it is sunk there
        elif body is not self.sunk[expected]:  # a new view of the same bytes each time: compare identity
            if len(body) != region.nbytes:
                raise ValueError(f"chunk {expected} has {len(body)} bytes, expected {region.nbytes}")
            region[:] = body
        self.metas[expected] = payload[1]
        return self.decode(expected)

    def decode(self, index: int) -> torch.Tensor:
        return self.codec.decode(self.metas[index], self.region(index), self.chunks[index].numel)
