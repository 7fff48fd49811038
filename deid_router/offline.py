"""Offline batch de-identification (``deid-router deidentify``).

Same engine, keys and crosswalk as the node. Files are spread over worker processes; each
output is written atomically under ``OUT/<study>/<series>/<sop>.dcm`` (output UIDs, the path
built by store/layout.py, which refuses anything but a UID: such an input is quarantined); an input
the engine refuses is copied to the sibling ``quarantine/`` folder with a reason file that
names the reason and the attribute path, never a value.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from deid_router.config import Config
from deid_router.errors import DeidError, DeidRouterError, UnsafePathError
from deid_router.store import layout
from deid_router.store.holding import Holding

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
    from deid_router.app import build_context

    ctx = build_context(config)
    _worker_state["ctx"] = ctx
    _worker_state["deid"] = ctx.deidentifier(profile)


def _process(src: str, out: str, quarantine: str) -> FileResult:
    from deid_router.deid.engine import Deidentifier

    deid = _worker_state["deid"]
    assert isinstance(deid, Deidentifier)
    path = Path(src)
    if not path.is_file():
        return FileResult(src, "skipped", "not a file")
    if not _is_dicom(path):
        return FileResult(src, "skipped", "not a DICOM Part-10 file")
    out_dir = Path(out)
    holding = Holding(out_dir)
    tmp = layout.temp_path(out_dir)
    try:
        with holding.atomic_writer(tmp) as fh:
            result = deid.deidentify_file(path, fh)
        try:
            final = layout.instance_path(
                out_dir, result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
        except UnsafePathError as exc:
            raise DeidError("invalid_uid_for_path", str(exc)) from exc
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
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
    from deid_router.app import build_context

    build_context(config, run_migrations=True).close()  # the crosswalk table must exist
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    quarantine = out.parent / "quarantine"
    n_workers = max(1, min(workers or (os.cpu_count() or 1), len(files) or 1))
    counts = {"ok": 0, "quarantined": 0, "skipped": 0}
    total = len(files)
    with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker, initargs=(config, profile)) as pool:
        futures = [pool.submit(_process, str(f), str(out), str(quarantine)) for f in files]
        for done, fut in enumerate(as_completed(futures), 1):
            res = fut.result()
            counts[res.status] += 1
            if res.status == "quarantined":
                print(f"\nquarantined: {res.src} ({res.detail})", file=sys.stderr)
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
