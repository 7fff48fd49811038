"""Offline batch de-identification (``deid-router deidentify``).

Same engine, keys and crosswalk as the node, without the node: nothing of the server (DICOM
network, scheduler, destinations) is imported. Files go to worker processes (one per
``IN_PROCESS_MAX`` files, up to ``--workers``; a batch one worker would do runs in this process) in
chunks of paths, one task per chunk, not per file; each chunk's crosswalk rows come back with its
results and are stored here, one transaction per chunk; progress is redrawn per chunk. Each
output is written atomically under ``OUT/<study>/<series>/<sop>.dcm`` (output UIDs, the path
built by store/layout.py, which refuses anything but a UID: such an input is quarantined); an input
the engine refuses is copied to the sibling ``quarantine/`` folder with a reason file that
names the reason and the attribute path, never a value.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from deid_router.config import Config
from deid_router.deid.crosswalk import BufferedCrosswalk, CrosswalkRow
from deid_router.errors import DeidError, DeidRouterError, UnsafePathError
from deid_router.store import layout

IN_PROCESS_MAX = 32  # files per worker process; up to this many, no worker is started
CHUNK_MAX = 32  # paths per worker task
CHUNKS_PER_WORKER = 4  # at least, so that workers finish together

_worker_state: dict[str, object] = {}


@dataclass(frozen=True)
class FileResult:
    src: str
    status: str  # "ok" | "quarantined" | "skipped"
    detail: str = ""


def iter_inputs(inputs: list[Path]) -> Iterator[Path]:
    for item in inputs:
        if item.is_dir():
            for p in sorted(item.rglob("*")):
                if p.is_file() and p.name != "DICOMDIR":
                    yield p
        else:
            yield item


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _init_worker(config: Config, profile: str = "") -> None:
    """The engine of ``profile`` ("": [deid]), its scope's keys and a buffering crosswalk:
    no database, no server parts."""
    if "deid" in _worker_state:
        return
    from deid_router.deid.engine import Deidentifier
    from deid_router.deid.keys import Keys

    p = config.profile(profile)
    keys = Keys.load_or_create(config.deid.secret_file).for_scope(p.scope)
    crosswalk = BufferedCrosswalk(keys)
    _worker_state["crosswalk"] = crosswalk
    _worker_state["deid"] = Deidentifier(p.deid, keys, crosswalk)


@dataclass(frozen=True)
class ChunkResult:
    results: list[FileResult]
    crosswalk: list[CrosswalkRow]


def _process_chunk(paths: list[str], out: str, quarantine: str) -> ChunkResult:
    """De-identify a chunk of paths; the crosswalk rows they produced come back with them."""
    results = []
    renames: list[tuple[Path, Path]] = []
    for src in paths:
        try:
            results.append(_process(src, out, quarantine, renames))
        except Exception as exc:  # noqa: BLE001  # one bad input never loses the chunk's rows
            results.append(FileResult(src, "quarantined", f"unexpected {type(exc).__name__}"))
    _commit(renames, Path(out))
    crosswalk = _worker_state["crosswalk"]
    assert isinstance(crosswalk, BufferedCrosswalk)
    return ChunkResult(results, crosswalk.take())


def _commit(renames: list[tuple[Path, Path]], out: Path) -> None:
    """Make a chunk durable with two file-system syncs instead of three fsyncs per file: the
    contents (and quarantine copies) under temporary names first, then the renames to the
    final names. A crash before the first sync leaves only hidden temporary files."""
    _syncfs(out)
    for tmp, final in renames:
        os.replace(tmp, final)
    if renames:
        _syncfs(out)


def _syncfs(path: Path) -> None:
    """syncfs(2) on the file system holding ``path`` (sync(2) where there is none)."""
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            _libc_syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _libc_syncfs = False
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _libc_syncfs or _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_libc_syncfs: Any = None


def _chunks(files: list[Path], processes: int) -> list[list[str]]:
    size = max(1, min(CHUNK_MAX, math.ceil(len(files) / (max(1, processes) * CHUNKS_PER_WORKER))))
    return [[str(f) for f in files[i:i + size]] for i in range(0, len(files), size)]


def _process_count(workers: int, n_files: int) -> int:
    """Worker processes for ``n_files`` (0: in this process).

    One worker per ``IN_PROCESS_MAX`` files, up to ``--workers`` (default: the CPU cores); a
    batch one worker would do is done in this process (starting a worker costs more).
    """
    limit = workers or (os.cpu_count() or 1)
    processes = min(limit, math.ceil(n_files / IN_PROCESS_MAX))
    return processes if processes > 1 else 0


def _process(src: str, out: str, quarantine: str, renames: list[tuple[Path, Path]]) -> FileResult:
    """De-identify one file under a temporary name; ``renames`` gets (temporary, final)."""
    from deid_router.deid.engine import Deidentifier

    deid = _worker_state["deid"]
    assert isinstance(deid, Deidentifier)
    path = Path(src)
    if not path.is_file():
        return FileResult(src, "skipped", "not a file")
    if not _is_dicom(path):
        return FileResult(src, "skipped", "not a DICOM Part-10 file")
    out_dir = Path(out)
    tmp = layout.temp_path(out_dir)
    try:
        with open(tmp, "wb") as fh:  # made durable with the rest of its chunk (_commit)
            result = deid.deidentify_file(path, fh)
        try:
            final = layout.instance_path(
                out_dir, result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
        except UnsafePathError as exc:
            raise DeidError("invalid_uid_for_path", str(exc)) from exc
        final.parent.mkdir(parents=True, exist_ok=True)
        renames.append((tmp, final))
        return FileResult(src, "ok")
    except DeidError as exc:
        tmp.unlink(missing_ok=True)
        qdir = Path(quarantine)
        qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy, reason = layout.quarantine_paths(qdir)
        # The copy is identified, the reason file names the source file: both private (0600).
        with open(path, "rb") as fin, _private_file(copy) as fout:
            shutil.copyfileobj(fin, fout)
        with _private_file(reason) as fout:
            fout.write(f"source: {src}\nreason: {exc.reason}\npath: {exc.path}\ndetail: {exc.detail}\n".encode())
        return FileResult(src, "quarantined", exc.reason)
    except (DeidRouterError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        return FileResult(src, "quarantined", type(exc).__name__)


def _private_file(path: Path) -> BinaryIO:
    """A new file only its owner can read (0600 whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "wb")


def run_offline(config: Config, inputs: list[Path], out: Path, workers: int, dry_run: bool,
                preview: Path | None = None, profile: str = "") -> int:
    """``profile``: a [profiles.NAME] (its options and scope), or "" for [deid]."""
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        for m in missing:
            print(f"deid-router: input not found: {m}", file=sys.stderr)
        return 2
    files = list(iter_inputs(inputs))
    if dry_run:
        return _dry_run(config, files, preview, profile)
    out = out.resolve()
    quarantine = out.parent / "quarantine"
    processes = _process_count(workers, len(files))
    chunks = _chunks(files, processes)
    work = partial(_process_chunk, out=str(out), quarantine=str(quarantine))
    counts = {"ok": 0, "quarantined": 0, "skipped": 0}
    total = len(files)
    with ExitStack() as stack:
        from deid_router.db.crosswalk_rows import crosswalk_store
        from deid_router.db.guard import database_label, keys_for_serve

        store = crosswalk_store(config)  # the crosswalk table must exist before anything is written
        stack.callback(store.engine.dispose)
        # as for serve: the secret is checked against (or recorded in) the database before use
        keys_for_serve(store, config.deid.secret_file, database_label(config.queue.url))
        scope = config.profile(profile).scope
        _init_worker(config, profile)  # built once here: forked workers inherit it
        out.mkdir(parents=True, exist_ok=True)
        results: Iterator[ChunkResult]
        if processes:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(multiprocessing.get_context(method).Pool(processes, _init_worker, (config, profile)))
            results = pool.imap_unordered(work, chunks)
        else:
            results = map(work, chunks)
        done = 0
        seen: set[tuple[str, str]] = set()
        for chunk in results:
            rows = [r for r in chunk.crosswalk if (r[0], r[1]) not in seen]
            store.crosswalk_record_many(rows, scope)
            seen.update((r[0], r[1]) for r in rows)
            for res in chunk.results:
                counts[res.status] += 1
                if res.status == "quarantined":
                    print(f"\nquarantined: {res.src} ({res.detail})", file=sys.stderr)
            done += len(chunk.results)
            _progress(done, total, counts)
    print(file=sys.stderr)
    print(
        f"{counts['ok']} de-identified into {out}, {counts['quarantined']} quarantined"
        + (f" into {quarantine}" if counts["quarantined"] else "")
        + f", {counts['skipped']} skipped (not DICOM)"
    )
    return 1 if counts["quarantined"] else 0


def _progress(done: int, total: int, counts: dict[str, int]) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total}  ok={counts['ok']} quarantined={counts['quarantined']}")
    sys.stderr.flush()


def _dry_run(config: Config, files: list[Path], preview: Path | None = None, profile: str = "") -> int:
    from pydicom import dcmread

    from deid_router.deid.crosswalk import NullCrosswalk
    from deid_router.deid.engine import Deidentifier
    from deid_router.deid.keys import Keys
    from deid_router.deid.plan import dry_run

    # A dry run changes nothing: no database, secret or folder is created. Without a secret
    # yet, the UIDs and pseudonyms shown are those of a throw-away key.
    if config.deid.secret_file.exists():
        keys = Keys.load(config.deid.secret_file)
    else:
        import secrets

        print("warning: deid.secret_file does not exist yet: new UIDs and pseudonyms shown are examples",
              file=sys.stderr)
        keys = Keys(secrets.token_bytes(32))
    p = config.profile(profile)
    deid = Deidentifier(p.deid, keys.for_scope(p.scope), NullCrosswalk())
    for f in files:
        if not _is_dicom(f):
            continue
        print(f"== {f}")
        try:
            for line in dry_run(deid, dcmread(f, stop_before_pixels=True)):
                print("  " + "\t".join("" if v is None else str(v) for v in line))
        except DeidError as exc:
            print(f"  quarantined\t{exc.reason}\t{exc.path}")
        if preview is not None:
            from deid_router.deid.preview import write_preview

            name = f"{files.index(f):04d}-{f.stem}"
            print(f"  pixels\t{write_preview(deid, f, preview, name)}\t{preview / name}.*.png")
    return 0
