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
/dev/shm is an error at creation and not a SIGBUS later; its buffers take at most half the
space left there, which others need too. It offers a buffer to the one peer that may write into
it, over their authenticated connection: the file's name, a random token, and a digest of the
chunk layout. The file starts with a header: the token, and a tag of the writer's peer id.
The writer maps the file only if it is a regular file of our user with one link that no one
else may open, large enough, whose header holds that token and names it as the writer. It
checks that the layout matches its own. Then it copies each chunk there and sends the chunk's
message on the stream without a body (`SHM`). Whatever fails (no /dev/shm, no room, another
user, another mount namespace) leaves that pair on the stream, and the pair stops offering
for a while (so they may take bulk links again).

Published averages: a reducer with two senders or more averages into a buffer of its own
(AllReduceRunner._publication), and offers it to every sender on this host that says it can
read one ("read"); they read their averages there, not in a buffer of their own that it writes
into once per sender. Its header names the reducer as the one that publishes it, with a tag of
another kind than a writer's (`buffer_tag`), so no peer can offer it back to anyone as a buffer
to write into. Two such buffers alternate by the parity of the reducer's rounds, and a reader
says it is done (its END) only once it has copied its averages out; the reducer waits for that
END (up to next_chunk_timeout) before its round ends. So it writes into a buffer that someone
still reads only if that reader went quiet for that long and is then still copying two rounds
later. At 4 x 50M fp32 on 2 cores publishing spared 2 of a peer's 6 big copies: 18-20 ms of its
140 ms of CPU per round.

State downloads (state.py): a donor keeps the copy of its state that downloads stream from in
a file it publishes, and a downloader of this host reads it with preadv straight into its
tensors (`PublishedReader`), without mapping it.

Trust: only processes of our own user can open these files (on this host, or in a container
that shares our /dev/shm). Such a process can usually change our code, our checkpoints and our
files already; we trust it to write into our receive buffers, even after we have checked them.
For the same reason a reader does not audit the averages a reducer publishes (audit.py): the
publisher could rewrite them between the audit and the copy. The token and the writer's tag
keep a peer of another user, which sees the files' names in /dev/shm, from making us write into
a buffer that was not offered to us. Processes of one user that must not trust each other turn
shared memory off: `shared_memory=False`, or `encrypt_same_host` (peers that seal the links
between processes of one host do not use it).

Cleanup: a file is removed when its buffer is replaced or freed, when the averager shuts down,
or when the interpreter exits. Its creator holds a shared lock on it while it lives. A process
killed outright leaves its files behind: every process of our user on the host that uses
shared memory looks for files that nobody holds a lock on, 10 s old or more, every 10 s (at the
end of a round or when it makes a buffer), and removes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from hivecli._exceptions import HiveError

logger = logging.getLogger(__name__)

DIRECTORY = "/dev/shm"
SHM = "shm"  # a chunk message's third field: the body is in the receiver's shared buffer already
_NAME = re.compile(r"hive-\d{1,7}-[0-9a-f]{32}")
HEADER = 32  # a buffer file's first bytes: the token (16), then the writer's tag (16)
MAX_ATTACHED = 64  # the other sides' buffers we keep mapped, least recently used dropped first
REFUSAL_MEMORY_S = 300.0  # how long a pair that could not share memory stays on the stream
RETRY_S = 60.0  # how long after we could not make a buffer we try again
ORPHAN_AGE_S = 10.0  # a file younger than this may be one whose creator has not locked it yet


def buffer_tag(peer: bytes, published: bool) -> bytes:
    """What a buffer's header says of `peer`: the one that may write into it, or where it is a
    published buffer, the one that publishes it (a tag that never passes for a writer's)."""
    return hashlib.blake2b(peer, digest_size=16, person=b"published" if published else b"").digest()


def _tag_to_check(me: bytes, publisher: bytes | None) -> bytes:
    """The tag that a buffer offered to us must carry: us as its writer, or its `publisher`."""
    return buffer_tag(me, False) if publisher is None else buffer_tag(publisher, True)


def layout_tag(offsets: Sequence[int]) -> str:
    """A digest of a buffer's chunk layout (where each chunk starts): a writer's and the
    reader's must match, or a chunk would land across two of the reader's."""
    return hashlib.blake2b(struct.pack(f"<{len(offsets)}q", *offsets), digest_size=8).hexdigest()


class SharedBuffer:
    """A byte buffer in a file under /dev/shm that one other process of our user may map."""

    def __init__(self, name: str, memory: mmap.mmap, token: bytes, lock: int | None, tag: bytes = b""):
        self.name, self.token = name, token
        self.tag = tag  # the header's tag we checked when we mapped it (buffer_tag): a cached mapping must match
        self.capacity = len(memory) - HEADER
        self._bytes = torch.frombuffer(memory, dtype=torch.uint8)
        # where we created the file: removed, and our fd with its shared lock closed, by free() or at exit
        path = os.path.join(DIRECTORY, name)
        self._finalizer = weakref.finalize(self, _remove, path, lock) if lock is not None else None

    @classmethod
    def create(cls, nbytes: int, writer: bytes, published: bool = False, ours: int = 0) -> SharedBuffer:
        """A new buffer of `nbytes` that only processes of our user can open, and only the peer
        `writer` (its id's bytes) may write into; or, `published`, that `writer` publishes.
        With the `ours` bytes our other buffers take, it may take at most half of /dev/shm's
        free space, which others need too.

        Raises:
            OSError: no /dev/shm, or no room there (ENOSPC past that half).
        """
        space = os.statvfs(DIRECTORY)
        if ours + nbytes > (ours + space.f_bavail * space.f_frsize) // 2:
            raise OSError(errno.ENOSPC, "our buffers would take more than half of its free space")
        _remove_orphans()
        name = f"hive-{os.getpid() % 10_000_000}-{secrets.token_hex(16)}"
        path = os.path.join(DIRECTORY, name)
        size = HEADER + max(nbytes, 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while it lives: a file nobody locks is an orphan
            os.posix_fallocate(fd, 0, size)  # ENOSPC here, not SIGBUS at the first write
            memory = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        token = secrets.token_bytes(16)
        memory[:HEADER] = token + buffer_tag(writer, published)
        return cls(name, memory, token, fd)

    @classmethod
    def attach(cls, offer: Any, nbytes: int, me: bytes, publisher: bytes | None = None) -> SharedBuffer:
        """Map the buffer another process offered us ([name, token hex, layout]), which must
        hold at least `nbytes` and name us (`me`, our peer id's bytes) as its writer; or with a
        `publisher`, name that peer as the one that publishes it (we only read it).

        Raises:
            HiveError: the offer is malformed, or the file is missing, not a regular file of our
                user with one link that only we may open, too small, or not offered to us.
        """
        fd, name, token, size = _open_offered(offer, nbytes, os.O_RDWR)
        try:
            memory = mmap.mmap(fd, size)
        except OSError as e:
            raise HiveError(f"cannot map shared buffer {name}: {e.strerror}") from None
        finally:
            os.close(fd)
        tag = _tag_to_check(me, publisher)
        if not hmac.compare_digest(memory[:HEADER], token + tag):
            memory.close()
            raise HiveError(f"shared buffer {name} was not offered to us")
        return cls(name, memory, token, None, tag)

    def region(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the buffer, past its header."""
        return self._bytes[HEADER : HEADER + nbytes]

    def offer(self, layout: str) -> list[str]:
        """What the writer needs to map this buffer and check it: [name, token, layout]."""
        return [self.name, self.token.hex(), layout]

    def free(self) -> None:
        """Remove our file (the memory goes once neither side maps it any more)."""
        if self._finalizer is not None:
            self._finalizer()


class SharedBuffers:
    """One averager's shared buffers: those it receives into or publishes in, by key (created
    once per key and size, as BufferPool keeps its buffers between rounds), and the other
    sides' buffers it writes into or reads, by name (mapped once, the last MAX_ATTACHED kept).

    Its own buffers are keyed by the peer whose bytes they receive, not by that peer's place in
    the group: a peer that was dropped from a round and still writes, late, can only write into
    the buffer of its own next part."""

    def __init__(self, me: bytes) -> None:
        self.me = me  # our peer id's bytes: what the buffers we may write into must name
        self._own: OrderedDict[Any, SharedBuffer] = OrderedDict()  # least recently used first
        self._attached: OrderedDict[str, SharedBuffer] = OrderedDict()
        self._retry_at = 0.0  # making one failed: the stream until then
        self._refused: dict[Any, float] = {}  # peer -> until when we do not offer it shared memory
        self._used: set[Any] = set()  # keys of our own buffers used since `end_round`
        self._mapped: set[str] = set()  # names of the other sides' buffers used since `end_round`
        self._mapped_before: set[str] = set()  # and in the round before (published buffers alternate)
        self.rounds = 0  # rounds ended: a reducer publishes its averages in one of two buffers by its parity

    def usable(self, peer: Any) -> bool:
        """Whether to offer `peer` shared memory now: it did not fail with it lately."""
        return self._refused.get(peer, 0.0) <= time.monotonic()

    def refuse(self, peer: Any) -> None:
        """Sharing memory with `peer` did not work: the stream (or a bulk link) for a while."""
        self._refused[peer] = time.monotonic() + REFUSAL_MEMORY_S
        while len(self._refused) > 1024:
            del self._refused[next(iter(self._refused))]

    def get(self, key: Any, nbytes: int, writer: bytes, published: bool = False) -> SharedBuffer | None:
        """Our buffer for `key`, of at least `nbytes`, that the peer `writer` may write into (or,
        `published`, that we publish: `writer` is us); None where we cannot make one (logged
        once per failure)."""
        if time.monotonic() < self._retry_at:
            return None
        self._used.add(key)
        buffer = self._own.get(key)
        if buffer is not None and buffer.capacity >= max(nbytes, 1):
            self._own.move_to_end(key)
            return buffer
        if buffer is not None:
            del self._own[key]
            buffer.free()
        try:
            ours = sum(b.capacity for b in self._own.values())
            buffer = self._own[key] = SharedBuffer.create(nbytes, writer, published, ours)
        except Exception as e:  # anything: the stream works without it
            self._retry_at = time.monotonic() + RETRY_S
            logger.info(
                "Peers on this host average through loopback TCP, not shared memory: cannot make a buffer of %d "
                "bytes in %s (%s); trying again in %g s",
                nbytes,
                DIRECTORY,
                (e.strerror if isinstance(e, OSError) else None) or e,
                RETRY_S,
            )
            return None
        return buffer

    def attach(self, offer: Any, nbytes: int, layout: str, publisher: bytes | None = None) -> torch.Tensor | None:
        """`nbytes` of the other side's buffer that `offer` names: to write into, or with a
        `publisher` (the offering peer's id bytes), a buffer that peer publishes its averages in,
        to read; None if it cannot be used (logged at debug level)."""
        if not (isinstance(offer, list) and len(offer) == 3 and offer[2] == layout):
            logger.debug("Not mapping a peer's shared buffer: no offer, or another chunk layout (%.80r)", offer)
            return None
        if any(own.name == offer[0] for own in self._own.values()):
            logger.debug("Not mapping a peer's shared buffer: %.80r is one of ours", offer[0])
            return None
        tag = _tag_to_check(self.me, publisher)
        buffer = self._attached.get(offer[0])
        if buffer is None or buffer.token.hex() != offer[1] or buffer.tag != tag or buffer.capacity < max(nbytes, 1):
            try:
                buffer = SharedBuffer.attach(offer, nbytes, self.me, publisher)
            except HiveError as e:
                logger.debug("Not mapping a peer's shared buffer: %s", e)
                return None
            self._attached[buffer.name] = buffer
            while len(self._attached) > MAX_ATTACHED:
                self._attached.popitem(last=False)
        self._attached.move_to_end(buffer.name)
        self._mapped.add(buffer.name)
        return buffer.region(nbytes)

    def end_round(self) -> None:
        """A round is over: keep at most twice as many of our buffers as it used, the most
        recently used (peers that come and go in groups of changing members keep theirs for
        a while; those that left go), and only the other sides' buffers that it or the round
        before mapped (a reducer's two published buffers alternate). Every ORPHAN_AGE_S,
        remove the files of peers on this host that were killed outright."""
        if self._own:
            _remove_orphans()
        while len(self._own) > 2 * len(self._used):
            self._own.popitem(last=False)[1].free()
        for name in [name for name in self._attached if name not in self._mapped | self._mapped_before]:
            del self._attached[name]
        self._used.clear()
        self._mapped_before, self._mapped = self._mapped, set()
        self.rounds += 1

    def clear(self) -> None:
        for buffer in self._own.values():
            buffer.free()
        self._own.clear()
        self._attached.clear()
        self._used.clear()
        self._mapped.clear()


def _open_offered(offer: Any, nbytes: int, flags: int) -> tuple[int, str, bytes, int]:
    """Open the file that `offer` ([name, token hex, layout]) names: (fd, name, token, size).
    The caller checks the header and closes the fd.

    Raises:
        HiveError: the offer is malformed, or the file is missing, not a regular file of our
            user with one link that only we may open, or holds fewer than `nbytes`.
    """
    if not (isinstance(offer, list) and len(offer) == 3 and all(isinstance(x, str) for x in offer)):
        raise HiveError(f"{str(offer)[:80]!r} is not an offer of a shared buffer")
    name, token = offer[0], offer[1]
    if not _NAME.fullmatch(name) or not re.fullmatch(r"[0-9a-f]{32}", token):
        raise HiveError(f"{name[:80]!r} is not the name of a shared buffer, or its token is malformed")
    try:
        fd = os.open(os.path.join(DIRECTORY, name), flags | os.O_NOFOLLOW)
    except OSError as e:
        raise HiveError(f"cannot open shared buffer {name}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and info.st_nlink == 1) or (
            info.st_mode & 0o077
        ):
            raise HiveError(f"shared buffer {name} is not a file of our own user that only we may open")
        if info.st_size < HEADER + max(nbytes, 1):
            raise HiveError(f"shared buffer {name} holds {info.st_size - HEADER} bytes, we need {nbytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd, name, bytes.fromhex(token), info.st_size


class PublishedReader:
    """A buffer another peer of this host publishes (a donor's state, state.py), read with
    preadv straight into memory of our own, not mapped: a fresh mapping of a 200 MB state
    pays a page fault per 4 KiB before the copy out of it even starts."""

    def __init__(self, fd: int, name: str):
        self._fd: int | None = fd
        self.name = name

    @classmethod
    def open(cls, offer: Any, nbytes: int, publisher: bytes) -> PublishedReader:
        """The buffer `offer` names, of at least `nbytes`, which `publisher` (the offering
        peer's id bytes) must publish.

        Raises:
            HiveError: as SharedBuffer.attach, or the header does not name `publisher`.
        """
        fd, name, token, _ = _open_offered(offer, nbytes, os.O_RDONLY)
        try:
            header = os.pread(fd, HEADER, 0)
        except OSError as e:
            os.close(fd)
            raise HiveError(f"cannot read shared buffer {name}: {e.strerror}") from None
        if not hmac.compare_digest(header, token + buffer_tag(publisher, True)):
            os.close(fd)
            raise HiveError(f"shared buffer {name} was not offered to us")
        return cls(fd, name)

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the buffer's bytes from `offset` (past its header) on.

        Raises:
            HiveError: the file ends first, or cannot be read.
        """
        assert self._fd is not None, "read after close"
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], HEADER + offset + done)
            except OSError as e:
                raise HiveError(f"cannot read shared buffer {self.name}: {e.strerror}") from None
            if n <= 0:
                raise HiveError(f"shared buffer {self.name} ends before byte {offset + len(view)}")
            done += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _remove(path: str, lock: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(lock)


def _remove_orphans() -> None:
    """Remove the files of our user that nobody holds a lock on (a process killed outright);
    at most once every ORPHAN_AGE_S."""
    global _next_orphan_scan
    if time.monotonic() < _next_orphan_scan:
        return
    _next_orphan_scan = time.monotonic() + ORPHAN_AGE_S
    try:
        names = os.listdir(DIRECTORY)
    except OSError:
        return
    for name in names:
        if not _NAME.fullmatch(name):
            continue
        path = os.path.join(DIRECTORY, name)
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if (
                info.st_uid != os.getuid()
                or not stat.S_ISREG(info.st_mode)
                or time.time() - info.st_mtime < ORPHAN_AGE_S
            ):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError (EWOULDBLOCK): its creator lives
                os.unlink(path)
            finally:
                os.close(fd)


_next_orphan_scan = 0.0  # monotonic time of the next look for orphans
