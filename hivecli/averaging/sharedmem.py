"""Shared memory between two peers on one host: the receiving side's buffers, which the sending
side writes into directly (`AveragingSettings.shared_memory`).

Why: between two processes of one host, a chunk sent over loopback TCP is copied twice by the
kernel (into the socket and out of it) and walks its network stack on the way. On 2 cores
those copies and that stack were about half the CPU of a 2 x 50M round (`perf`,
docs/benchmarks.md). Through a buffer both processes map, a chunk costs one copy, which the
sender makes straight into the receiver's buffer. NCCL moves bytes between the processes of
one node the same way.

How: the receiving side keeps the buffers it receives into (a reducer's part from each sender,
a sender's averages from each reducer) in files under /dev/shm. It creates each file itself,
with mode 0600 and a random name, and reserves the file's space up front, so that a full
/dev/shm is an error at creation and not a SIGBUS later; it takes at most half the space left
there, which others need too. It names the file in its part request
or in its "ready". The other side maps the named file after checking that it is a regular file
of our own user that no one else may open, of the expected size. Then it copies each chunk
there and sends the chunk's message on the stream without a body (`SHM`). Whatever fails (no
/dev/shm, no room, another user, another mount namespace) leaves that pair on the stream, chunk
by chunk, as before.

Trust: only processes of our own user can open these files. Such a process can already change
our code, our checkpoints and our files. Letting it write into our receive buffers, even after
we have checked them, gives it nothing it did not already have. Peers that seal the links
between processes of one host (`encrypt_same_host`) do not use shared memory.

Cleanup: a file is removed when its buffer is replaced or freed, or when the averager shuts
down. A process killed outright leaves its files behind. Each file's name carries its creator's
pid, and the next process on the host that creates one removes the files whose creator is gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import stat
from collections import OrderedDict

import torch

from hivecli._exceptions import HiveError

logger = logging.getLogger(__name__)

DIRECTORY = "/dev/shm"
SHM = "shm"  # a chunk message's third field: the body is in the receiver's shared buffer already
_NAME = re.compile(r"hive-(\d{1,10})-[0-9a-f]{32}")
MAX_ATTACHED = 64  # the other sides' buffers we keep mapped, least recently used dropped first


class SharedBuffer:
    """A byte buffer in a file under /dev/shm that another process of our user may map."""

    def __init__(self, name: str, memory: mmap.mmap, owner: bool):
        self.name, self.owner = name, owner
        self._memory: mmap.mmap | None = memory
        self.tensor = torch.frombuffer(memory, dtype=torch.uint8) if len(memory) else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, nbytes: int) -> SharedBuffer:
        """A new buffer of `nbytes` (at least 1) that only processes of our user can open.

        Raises:
            OSError: no /dev/shm, or it would be more than half full of ours (others need room
                there too: PyTorch's DataLoader workers pass their batches through it).
        """
        _remove_orphans()
        space = os.statvfs(DIRECTORY)
        if nbytes > space.f_bavail * space.f_frsize // 2:
            raise OSError(errno.ENOSPC, f"{nbytes} bytes would take more than half the free space")
        name = f"hive-{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(DIRECTORY, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))  # ENOSPC here, not SIGBUS at the first write
            memory = mmap.mmap(fd, max(nbytes, 1))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return cls(name, memory, owner=True)

    @classmethod
    def attach(cls, name: object, nbytes: int) -> SharedBuffer:
        """Map the other side's buffer `name`, which must hold exactly `nbytes` (at least 1).

        Raises:
            HiveError: the name is not one of ours, or the file is missing, not a regular file,
                not our user's, open to others, or of another size.
        """
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise HiveError(f"{str(name)[:80]!r} is not the name of a shared buffer")
        try:
            fd = os.open(os.path.join(DIRECTORY, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise HiveError(f"cannot open shared buffer {name}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise HiveError(f"shared buffer {name} is not a file of our own user that only we may open")
            if info.st_size != max(nbytes, 1):
                raise HiveError(f"shared buffer {name} holds {info.st_size} bytes, expected {max(nbytes, 1)}")
            memory = mmap.mmap(fd, info.st_size)
        except OSError as e:
            raise HiveError(f"cannot map shared buffer {name}: {e.strerror}") from None
        finally:
            os.close(fd)
        return cls(name, memory, owner=False)

    def free(self) -> None:
        """Remove our file (the memory goes once neither side maps it any more)."""
        if self.owner:
            self.owner = False
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(DIRECTORY, self.name))


class SharedBuffers:
    """One averager's shared buffers: those it receives into, by key (created once per key and
    size, as BufferPool keeps its buffers between rounds), and the other sides' buffers it
    writes into, by name (mapped once, the last MAX_ATTACHED kept).

    Its own buffers are keyed by the peer whose bytes they receive, not by that peer's place in
    the group: a peer that was dropped from a round and still writes, late, can only write into
    the buffer of its own next part."""

    def __init__(self) -> None:
        self._own: OrderedDict[object, SharedBuffer] = OrderedDict()  # least recently used first
        self._attached: OrderedDict[str, SharedBuffer] = OrderedDict()
        self._failed = False  # creating one failed: we stay on the stream from then on
        self._used: set[object] = set()  # keys of our own buffers used since `end_round`

    def get(self, key: object, nbytes: int) -> SharedBuffer | None:
        """Our buffer for `key`, of at least `nbytes`; None where we cannot make one (logged once)."""
        if self._failed:
            return None
        self._used.add(key)
        buffer = self._own.get(key)
        if buffer is not None and buffer.tensor.numel() >= max(nbytes, 1):
            self._own.move_to_end(key)
            return buffer
        if buffer is not None:
            buffer.free()
        try:
            buffer = self._own[key] = SharedBuffer.create(nbytes)
        except OSError as e:
            self._own.pop(key, None)
            self._failed = True
            logger.info(
                "Peers on this host average through loopback TCP, not shared memory: cannot make a buffer of %d "
                "bytes in %s (%s)",
                nbytes,
                DIRECTORY,
                e.strerror or e,
            )
            return None
        return buffer

    def attach(self, name: object, nbytes: int) -> torch.Tensor | None:
        """The bytes of the other side's buffer `name` (exactly `nbytes`), or None if it cannot
        be used (logged at debug level: that pair stays on the stream)."""
        buffer = self._attached.get(name) if isinstance(name, str) else None
        if buffer is None or buffer.tensor.numel() != max(nbytes, 1):
            try:
                buffer = SharedBuffer.attach(name, nbytes)
            except HiveError as e:
                logger.debug("Not writing into a peer's shared buffer: %s", e)
                return None
            self._attached[buffer.name] = buffer
            while len(self._attached) > MAX_ATTACHED:
                self._attached.popitem(last=False)
        self._attached.move_to_end(buffer.name)
        return buffer.tensor[:nbytes]

    def end_round(self) -> None:
        """A round is over: keep at most twice as many of our buffers as it used, the most
        recently used (peers that come and go in groups of changing members keep theirs for
        a while; those that left go)."""
        while len(self._own) > 2 * len(self._used):
            self._own.popitem(last=False)[1].free()
        self._used.clear()

    def clear(self) -> None:
        for buffer in self._own.values():
            buffer.free()
        self._own.clear()
        self._attached.clear()
        self._used.clear()


def _remove_orphans() -> None:
    """Remove the files of our user whose creator is gone (a process killed outright)."""
    global _orphans_removed
    if _orphans_removed:
        return
    _orphans_removed = True
    try:
        names = os.listdir(DIRECTORY)
    except OSError:
        return
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(DIRECTORY, name)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


_orphans_removed = False
