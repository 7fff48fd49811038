"""The holding area: raw (identified) instances on disk, written so that a crash never leaves
a half file under a final name.

Layout is a pure function of ids this node generated (never of values a peer sent):
``<root>/raw/<id[:2]>/<node>~<id>.dcm`` for raw instances (written there as they arrive) and
``<root>/work/<node>/<job_id>.dcm`` for de-identified files waiting to be sent. A raw file
is data of record only once its row is committed: a kill before that leaves an orphan that
the node sweeps at its next start. Temporary files end in ``.part`` and are removed at start,
so a kill at any point leaves nothing behind that a later run could mistake for data.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import queue
import random
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from deid_router.errors import StorageError
from deid_router.faults import fault_point

PART_SUFFIX = ".part"


@dataclass(frozen=True)
class StoredFile:
    relative_path: str  # relative to the holding root, as recorded in the database
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux
    pass


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a byte range to disk now, without waiting for it.

    Called while a transfer is still arriving, so the fsync before the acknowledgement
    finds most of the file already on disk (0.15 instead of 0.7 ms for a 512 KB CT here).
    A hint only: durability still comes from that fsync.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """Delete ``path`` when the block fails; a disk error becomes a StorageError."""
    try:
        yield
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise StorageError(f"could not write file: {errno.errorcode.get(exc.errno or 0, 'EIO')}") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise


SPARE_SLOTS = 16384  # emptied raw files kept in spare/ for reuse, at most (see Holding.delete)
SPARE_AT_START = 1024  # spare files a node makes sure of when it starts
WORK_KEEP_BYTES = 64 * 1024 * 1024  # a larger work file is deleted after its send, not kept


class RawFile:
    """A raw instance being received, written under its final name as its bytes arrive.

    A failed write (ENOSPC) is recorded, the partial file removed at once (freeing its space)
    and the rest of the transfer discarded: the C-STORE is then answered 0xA700 so the
    modality keeps the instance and retries.

    It also does, while the bytes arrive, the work the acknowledgement would otherwise wait
    for: it hashes them (the duplicate/conflict check needs the digest) and starts their
    writeback to disk, so the fsync in :meth:`commit` has little left to do. Written in place,
    the file needs one fsync of itself and one of its directory (none when it was taken from
    the :class:`Holding`'s reserve of empty files whose entries are already durable).
    """

    WRITEBACK_BYTES = 256 * 1024

    def __init__(
        self, instance_id: str, path: Path, relative_path: str, head: bytes,
        fd: int | None = None, entry_durable: bool = False,
    ) -> None:
        self.instance_id = instance_id
        self.path = path
        self.relative_path = relative_path
        self.failed = False
        self.committed = False
        self._entry_durable = entry_durable
        self._hash = hashlib.sha256()
        self._written = 0
        self._flushed_to_disk = 0
        self._fd: int | None = fd
        if fd is None:
            try:
                self._fd = _create(path)
            except OSError:
                self.failed = True
                return
        self.write(head)

    def write(self, data: bytes | memoryview) -> None:
        if self.failed or self._fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            pending = self._written + len(data) - self._flushed_to_disk
            if pending >= self.WRITEBACK_BYTES:
                start_writeback(self._fd, self._flushed_to_disk, pending)
                self._flushed_to_disk += pending
        except OSError:
            self.failed = True
            self.discard()
            return
        self._hash.update(data)  # releases the GIL for chunks over 2 KB
        self._written += len(data)

    def sha256(self) -> str | None:
        """Digest of every byte written, or None if a write failed."""
        return None if self.failed else self._hash.hexdigest()

    def commit(self) -> StoredFile:
        """Make the file durable (file, then directory entry); raises :class:`StorageError`."""
        if self.failed or self._fd is None:
            raise StorageError("could not store raw instance: write failed")
        try:
            fault_point("after_raw_write_before_fsync")
            os.fsync(self._fd)
            self._close()
            if not self._entry_durable:
                fsync_dir(self.path.parent)
        except OSError as exc:
            self.discard()
            raise StorageError(f"could not store raw instance: {errno.errorcode.get(exc.errno or 0, 'EIO')}") from exc
        self.committed = True
        return StoredFile(self.relative_path, self._written, self._hash.hexdigest())

    def discard(self) -> None:
        """Close and remove the file, unless committed (then its row decides its fate)."""
        self._close()
        if not self.committed:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


@dataclass(frozen=True)
class _Reserved:
    """An empty raw file created ahead of need, its directory entry already fsync'd."""

    instance_id: str
    path: Path
    relative_path: str
    fd: int


class Holding:
    """Durable storage of raw instances and work files under one root."""

    RESERVE_SIZE = 4  # empty raw files kept ready per receiving process

    def __init__(self, root: Path, node: str = "local") -> None:
        if not node or "/" in node or "~" in node or node.startswith("."):
            raise StorageError("node names are host-port strings")
        self.root = root
        self.node = node
        self.raw_dir = root / "raw"
        # Per node: several nodes may share one holding volume, and each cleans only its own.
        self.work_dir = root / "work" / node
        self.spare_dir = root / "spare"
        self._spares: list[str] = []
        self._next_spare_scan = 0.0
        self._reserve: queue.Queue[_Reserved] | None = None
        self._reserve_stop = threading.Event()
        self._reserve_thread: threading.Thread | None = None

    def prepare(self) -> int:
        """Create the directories and remove this node's leftovers from a crash; return how many.

        Work files are never data of record (the raw file is, once committed), so everything in
        this node's work folder can go. Raw files without a database row are swept by the
        node (``sweep_orphans``), each node only its own.
        """
        for d in (self.root, self.raw_dir, self.work_dir, self.spare_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Every fan-out folder and some spare files up front: the first instances after a start
        # then cost no mkdir or create either.
        for i in range(256):
            try:
                (self.raw_dir / f"{i:02x}").mkdir(exist_ok=True)
            except OSError:
                break  # a full disk: made when first needed (Holding._raw_place)
        self._top_up_spares(SPARE_AT_START)
        removed = 0
        for d in (self.work_dir,):
            for p in _walk_files(d):
                p.unlink(missing_ok=True)
                removed += 1
        # A kill while the scheduler rewrote the metrics file leaves its temp file behind.
        metrics = self.metrics_path
        if metrics.parent.is_dir():
            for p in metrics.parent.glob(f"{metrics.name}.*{PART_SUFFIX}"):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def raw_relative(self, instance_id: str) -> str:
        """``raw/<id[:2]>/<node>~<id>.dcm``: the node prefix lets a node find its own orphans."""
        if not instance_id.isalnum():
            raise StorageError("instance ids are generated hex strings")
        return f"raw/{instance_id[:2]}/{self.node}~{instance_id}.dcm"

    def own_raw_files(self) -> list[str]:
        """Relative paths of raw files this node wrote (committed or orphaned by a crash)."""
        prefix = f"{self.node}~"
        return [
            p.relative_to(self.root).as_posix() for p in _walk_files(self.raw_dir) if p.name.startswith(prefix)
        ]

    def absolute(self, relative_path: str) -> Path:
        """The file a recorded relative path names, refusing any path that leaves the root.

        A string check (no filesystem access: it runs for every job): the paths are generated
        here, so this guards against a tampered row, not against symlinks an administrator
        made inside the holding root.
        """
        normal = os.path.normpath(relative_path)
        if os.path.isabs(normal) or normal in (".", "..") or normal.startswith("../") or "\0" in normal:
            raise StorageError("path outside the holding root")
        return self.root / normal

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics" / f"{self.node}.prom"

    @property
    def process_metrics_dir(self) -> Path:
        """This node's prometheus_client multiprocess files (``observability.process_metrics``)."""
        return self.root / "prometheus" / self.node

    def work_path(self, slot: str) -> Path:
        """The work file of a worker's slot (``<worker>-<lane>-<position in the batch>``)."""
        if not slot.replace("-", "").isalnum():
            raise StorageError("work slots are generated names")
        return self.work_dir / f"{slot}.dcm"

    def new_raw_file(self, head: bytes) -> RawFile:
        """Start receiving a new raw instance; ``head`` is its preamble and file meta."""
        if self._reserve is not None:
            try:
                r = self._reserve.get_nowait()
                return RawFile(r.instance_id, r.path, r.relative_path, head, fd=r.fd, entry_durable=True)
            except queue.Empty:
                pass
        instance_id, path, rel = self._raw_place()
        return RawFile(instance_id, path, rel, head)

    def _raw_place(self) -> tuple[str, Path, str]:
        instance_id = self.new_id()
        rel = self.raw_relative(instance_id)
        path = self.root / rel
        try:
            os.mkdir(path.parent)
        except FileExistsError:
            pass
        except OSError:
            pass  # creating the file reports the problem
        return instance_id, path, rel

    def start_reserve(self) -> None:
        """Keep a few empty raw files ready, created and made durable off the receive path.

        Creating a file and fsyncing its directory cost the acknowledgement about a millisecond
        per instance. Unused reserved files are removed by :meth:`stop_reserve`; after a crash
        they are orphans like any uncommitted raw file, swept at the node's next start.
        """
        if self._reserve is not None:
            return
        self._reserve = queue.Queue(maxsize=self.RESERVE_SIZE)
        self._reserve_stop.clear()
        self._reserve_thread = threading.Thread(
            target=self._fill_reserve, args=(self._reserve,), name="raw-reserve", daemon=True
        )
        self._reserve_thread.start()

    def _fill_reserve(self, reserve: queue.Queue[_Reserved]) -> None:
        while not self._reserve_stop.is_set():
            instance_id, path, rel = self._raw_place()
            try:
                fd = self._take_spare(path)
                if fd is None:
                    fd = _create(path)
            except OSError:
                self._reserve_stop.wait(1.0)  # disk full or read-only: receiving creates inline
                continue
            try:
                fsync_dir(path.parent)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                self._reserve_stop.wait(1.0)
                continue
            item = _Reserved(instance_id, path, rel, fd)
            while not self._reserve_stop.is_set():
                try:
                    reserve.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            else:
                _discard_reserved(item)
        while True:
            try:
                _discard_reserved(reserve.get_nowait())
            except queue.Empty:
                return

    def stop_reserve(self) -> None:
        """Stop refilling and remove the reserved files nobody took."""
        reserve, self._reserve = self._reserve, None
        thread, self._reserve_thread = self._reserve_thread, None
        self._reserve_stop.set()
        if reserve is None:
            return
        if thread is not None:
            thread.join(5.0)
        while True:
            try:
                _discard_reserved(reserve.get_nowait())
            except queue.Empty:
                return

    @contextmanager
    def work_writer(self, slot: str) -> Iterator[BinaryIO]:
        """Yield the work file of a slot to write a de-identified instance into.

        A work file is scratch, not data of record: the raw file and the database are, and a
        job whose worker dies is de-identified again from them (start-up clears the work
        folder). So no fsync and no rename: the worker writes it, sends it, and writes the
        slot's next instance over it, the same file rather than a new one per instance (see
        :meth:`delete` for what creating files costs). Written over in place and cut to
        length afterwards: a file truncated to zero would make ext4 write it to disk on close.
        A failed write removes it.
        """
        path = self.work_path(slot)
        with _removed_on_failure(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with open(fd, "wb", buffering=0) as fh:
                yield fh
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))

    def clear_work(self, prefix: str) -> int:
        """Remove a stopping worker's work files (``<prefix>-*``): a clean stop leaves nothing
        for the next start to remove, so its ``partial_files_removed`` warning means a crash."""
        removed = 0
        try:
            entries = list(os.scandir(self.work_dir))
        except OSError:
            return 0
        for entry in entries:
            if entry.name.startswith(f"{prefix}-"):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
        return removed

    def release_work(self, slot: str) -> None:
        """After a send: a large instance's work file goes; others stay for the slot's next one."""
        path = self.work_path(slot)
        try:
            if path.stat().st_size > WORK_KEEP_BYTES:
                path.unlink()
        except OSError:
            pass

    @contextmanager
    def atomic_writer(self, final: Path) -> Iterator[BinaryIO]:
        """Yield a file object; on clean exit the content is fsync'd and renamed to ``final``."""
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
        with _removed_on_failure(tmp):
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)

    def delete(self, relative_path: str) -> None:
        """Remove a raw file: emptied, then kept as a spare to be received into again.

        Creating files is what deleting them makes slow: where ext4 runs without a journal
        (this project's CI machines), creating a file steps, one by one, over every inode
        freed in the last minutes; at a few hundred instances a second that was a quarter of
        the listener's CPU. So a raw file is truncated (no byte of the instance stays) and
        renamed into one of :data:`SPARE_SLOTS` slots of ``spare/``, from which the reserve
        takes it; a slot already holding a spare is replaced, which bounds the pool.
        """
        path = self.absolute(relative_path)
        try:
            os.truncate(path, 0)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError("could not delete raw file") from exc
        try:
            os.rename(path, self.spare_dir / _spare_name(secrets.randbelow(SPARE_SLOTS)))
        except OSError:
            try:
                path.unlink(missing_ok=True)  # no spare folder (a command run without a node)
            except OSError as exc:
                raise StorageError("could not delete raw file") from exc

    def _top_up_spares(self, count: int) -> None:
        names = set(os.listdir(self.spare_dir))
        for slot in range(SPARE_SLOTS):
            if len(names) >= count:
                return
            name = _spare_name(slot)
            if name not in names:
                try:
                    os.close(_create(self.spare_dir / name))
                except FileExistsError:
                    pass  # another node sharing this volume made it meanwhile
                except OSError:
                    return  # a full disk: receiving creates its files as it goes
                names.add(name)

    def _take_spare(self, path: Path) -> int | None:
        """Move a spare file to ``path`` and open it, emptied; None when there is none."""
        while True:
            if not self._spares:
                now = time.monotonic()
                if now < self._next_spare_scan:
                    return None
                self._next_spare_scan = now + 1.0
                try:
                    self._spares = [e.name for e in os.scandir(self.spare_dir)]
                except OSError:
                    return None
                random.shuffle(self._spares)  # several processes take from the same pool
                if not self._spares:
                    return None
            name = self._spares.pop()
            try:
                os.rename(self.spare_dir / name, path)
            except FileNotFoundError:
                continue  # another process took it
            except OSError:
                return None
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                os.ftruncate(fd, 0)
            except OSError:
                path.unlink(missing_ok=True)
                return None
            return fd

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _spare_name(slot: int) -> str:
    return f"{slot:04x}"


def _discard_reserved(item: _Reserved) -> None:
    try:
        os.close(item.fd)
    except OSError:
        pass
    item.path.unlink(missing_ok=True)


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name
