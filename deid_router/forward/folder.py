"""Folder destination: ``<path>/<Study>/<Series>/<SOPInstance>.dcm``, written atomically.

Another program may watch the folder, so a file must appear complete or not at all: write
a temp file in the target directory, fsync, ``os.replace``, fsync the directory. The UIDs
are de-identified output UIDs, still validated before they become path components so a
malformed value can never escape the folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deid_router.config import DestinationConfig
from deid_router.forward.base import Delivery, is_valid_uid
from deid_router.faults import fault_point
from deid_router.forward.status import FailureKind, classify_failure
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.observability.logging import get_logger
from deid_router.store.holding import fsync_dir

_log = get_logger("forward")


def _makedirs(root: Path, parts: Sequence[str]) -> Path:
    """Create missing directories below ``root`` and fsync each parent that gained an entry."""
    current = root
    for part in parts:
        child = current / part
        if not child.is_dir():
            try:
                child.mkdir()
            except FileExistsError:
                pass
            fsync_dir(current)
        current = child
    return current


class FolderDestination:
    """Writes each instance once; a re-send replaces the file with identical content."""

    def __init__(self, cfg: DestinationConfig, calling_ae_title: str = "") -> None:
        if cfg.path is None:
            raise ValueError(f"destination {cfg.name!r} of type 'folder' has no path")
        self.name = cfg.name
        self._root = cfg.path

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        """Write each item; OSError (disk full, permissions) is retried, bad UIDs are not."""
        outcomes = {item.job_id: self._write(item) for item in items}
        counts: dict[str, int] = {}
        for o in outcomes.values():
            counts[o.kind.value] = counts.get(o.kind.value, 0) + 1
        _log.info("forward_batch_written", destination=self.name, items=len(items), outcomes=counts)
        return outcomes

    def _write(self, item: Delivery) -> Outcome:
        uids = (item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
        if not all(is_valid_uid(u) for u in uids):
            return classify_failure(FailureKind.INVALID_UID_FOR_PATH)
        tmp: str | None = None
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            target_dir = _makedirs(self._root, uids[:2])
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=target_dir)
            with os.fdopen(fd, "wb") as out, open(item.path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                fault_point("during_folder_write")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target_dir / f"{item.sop_instance_uid}.dcm")
            tmp = None
            fsync_dir(target_dir)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "unknown")
            _log.warning("forward_folder_write_failed", destination=self.name, job_id=item.job_id, errno=name)
            return classify_failure(FailureKind.FOLDER_WRITE_FAILED, name)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return Outcome(OutcomeKind.DELIVERED, None, "")

    def remove_partial_files(self) -> int:
        """Delete temp files a crash left mid-write; only safe while no worker writes here."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self._root):
            for name in files:
                if name.startswith(".tmp-") and name.endswith(".part"):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
        return removed

    def close(self) -> None:
        """Nothing to release."""
