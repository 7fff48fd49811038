"""Pixel rules: where a device burns text into its images (contract v2, "Pixel de-identification").

A rule names a device by globs (case-insensitive) on Manufacturer, ManufacturerModelName,
SoftwareVersions, Modality, SOPClassUID and PhotometricInterpretation, and by exact Rows and
Columns; an absent key matches anything. Its ``regions`` ([x0, y0, x1, y1]: columns x, rows y,
from the top left, x1 and y1 exclusive) are blacked out in every frame; ``crop`` keeps only
that box. ``verify = "strict"`` makes OCR refuse any text left outside the regions; ``fill``
sets the value written into the regions (default: black). ``source`` records where a region
came from.

Rules of ``deid.pixel_rules_file`` are tried first, then the ones shipped with the package
(``data/pixel-rules.toml``); the first match wins.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

GLOB_KEYS = ("manufacturer", "model", "software_version", "modality", "sop_class_uid", "photometric_interpretation")
RULE_KEYS = ("name", *GLOB_KEYS, "rows", "columns", "regions", "crop", "verify", "fill", "source")
VERIFY_CHOICES = ("identifiers", "strict")
SHIPPED = "pixel-rules.toml"

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PixelRule:
    name: str
    regions: tuple[Box, ...] = ()
    manufacturer: str = "*"
    model: str = "*"
    software_version: str = "*"
    modality: str = "*"
    sop_class_uid: str = "*"
    photometric_interpretation: str = "*"
    rows: int | None = None
    columns: int | None = None
    crop: Box | None = None
    verify: str = "identifiers"
    fill: int | None = None
    source: str = ""

    def matches(self, attrs: dict[str, str], rows: int, columns: int) -> bool:
        if self.rows is not None and self.rows != rows:
            return False
        if self.columns is not None and self.columns != columns:
            return False
        for key in GLOB_KEYS:
            pattern = getattr(self, key)
            if pattern != "*" and not fnmatch.fnmatchcase(attrs.get(key, "").upper(), pattern.upper()):
                return False
        return True


def _box(value: Any) -> Box | None:
    if (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        x0, y0, x1, y1 = value
        if 0 <= x0 < x1 and 0 <= y0 < y1:
            return (x0, y0, x1, y1)
    return None


def parse_rules(data: dict[str, Any], file: str) -> tuple[list[PixelRule], list[tuple[str, str, str]]]:
    """Rules of one TOML document and every problem found in it (file, key, reason)."""
    problems: list[tuple[str, str, str]] = []
    rules: list[PixelRule] = []
    for k in data:
        if k != "rules":
            problems.append((file, k, "unknown key (allowed: rules)"))
    raw = data.get("rules", [])
    if not isinstance(raw, list):
        return [], [*problems, (file, "rules", "must be an array of tables ([[rules]])")]
    for i, item in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            problems.append((file, where, "must be a table"))
            continue
        n = len(problems)
        for k in item:
            if k not in RULE_KEYS:
                problems.append((file, f"{where}.{k}", f"unknown key (allowed: {', '.join(RULE_KEYS)})"))
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append((file, f"{where}.name", "is required (a non-empty string)"))
        globs: dict[str, str] = {}
        for key in GLOB_KEYS:
            value = item.get(key, "*")
            if not isinstance(value, str) or not value:
                problems.append((file, f"{where}.{key}", "must be a non-empty string (a glob)"))
            else:
                globs[key] = value
        size: dict[str, int | None] = {}
        for key in ("rows", "columns"):
            value = item.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append((file, f"{where}.{key}", "must be a positive integer"))
                value = None
            size[key] = value
        regions: list[Box] = []
        raw_regions = item.get("regions", [])
        if not isinstance(raw_regions, list):
            problems.append((file, f"{where}.regions", "must be a list of [x0, y0, x1, y1]"))
            raw_regions = []
        for j, region in enumerate(raw_regions):
            box = _box(region)
            if box is None:
                problems.append((file, f"{where}.regions[{j}]",
                                 "must be [x0, y0, x1, y1] integers with 0 <= x0 < x1 and 0 <= y0 < y1"))
                continue
            problems.extend(_outside(file, f"{where}.regions[{j}]", box, size["rows"], size["columns"]))
            regions.append(box)
        crop = None
        if "crop" in item:
            crop = _box(item["crop"])
            if crop is None:
                problems.append((file, f"{where}.crop", "must be [x0, y0, x1, y1] integers with 0 <= x0 < x1 and 0 <= y0 < y1"))
            else:
                problems.extend(_outside(file, f"{where}.crop", crop, size["rows"], size["columns"]))
        if not regions and crop is None:
            problems.append((file, f"{where}.regions", "a rule needs at least one region or a crop"))
        verify = item.get("verify", "identifiers")
        if verify not in VERIFY_CHOICES:
            problems.append((file, f"{where}.verify", f"must be one of {', '.join(VERIFY_CHOICES)}"))
        fill = item.get("fill")
        if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool)):
            problems.append((file, f"{where}.fill", "must be an integer"))
        source = item.get("source", "")
        if not isinstance(source, str):
            problems.append((file, f"{where}.source", "must be a string"))
        if len(problems) == n:
            rules.append(PixelRule(
                name=str(name), regions=tuple(regions), rows=size["rows"], columns=size["columns"],
                crop=crop, verify=str(verify), fill=fill, source=str(source), **globs,
            ))
    return rules, problems


def _outside(file: str, where: str, box: Box, rows: int | None, columns: int | None) -> list[tuple[str, str, str]]:
    out = []
    if columns is not None and box[2] > columns:
        out.append((file, where, f"x1 {box[2]} is outside the image (columns = {columns})"))
    if rows is not None and box[3] > rows:
        out.append((file, where, f"y1 {box[3]} is outside the image (rows = {rows})"))
    return out


def read_rules_file(path: Path) -> tuple[list[PixelRule], list[tuple[str, str, str]]]:
    """Rules of a TOML file, or the problems (unreadable, not TOML, bad rules)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], [(str(path), "-", "file not found")]
    except PermissionError:
        return [], [(str(path), "-", "file not readable (permission denied)")]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return [], [(str(path), "-", f"not valid TOML: {exc}")]
    return parse_rules(data, str(path))


@lru_cache(maxsize=1)
def shipped_rules() -> tuple[PixelRule, ...]:
    text = resources.files("deid_router.deid").joinpath("data", SHIPPED).read_text(encoding="utf-8")
    rules, problems = parse_rules(tomllib.loads(text), SHIPPED)
    if problems:  # a packaging bug: the shipped file is tested
        raise ValueError(f"shipped pixel rules are invalid: {problems}")
    return tuple(rules)


def load_rules(user_file: Path | None) -> tuple[PixelRule, ...]:
    """The user's rules (first) and the shipped ones; a bad user file raises ValueError."""
    user: list[PixelRule] = []
    if user_file is not None:
        user, problems = read_rules_file(user_file)
        if problems:
            raise ValueError("; ".join(f"{f}: {k}: {r}" for f, k, r in problems))
    return (*user, *shipped_rules())


def find_rule(rules: tuple[PixelRule, ...], attrs: dict[str, str], rows: int, columns: int) -> PixelRule | None:
    for rule in rules:
        if rule.matches(attrs, rows, columns):
            return rule
    return None


# No rule matched, and deid.pixel_no_rule = "ocr_clear": forwarded untouched only if OCR reads no text.
OCR_CLEAR = PixelRule(name="(no rule: forwarded when OCR reads no text)", verify="strict")
