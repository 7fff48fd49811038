"""Destination types: each registers its name, its Destination class and its start-up cleanup.

A new type is one module with its Destination, its keys in ``config.py`` and one line in
``_TYPES`` below (after mercure's ``dispatch/target_types/registry.py``). Nothing else in the
node asks which type a destination is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deid_router.config import DestinationConfig

if TYPE_CHECKING:
    from deid_router.forward.base import Destination

# type name -> (module, Destination class): the module is imported when the type is used.
_TYPES: dict[str, tuple[str, str]] = {
    "dicom": ("deid_router.forward.dicom", "DicomDestination"),
    "folder": ("deid_router.forward.folder", "FolderDestination"),
    "dicomweb": ("deid_router.forward.dicomweb", "DicomwebDestination"),
}


@dataclass(frozen=True)
class DestinationType:
    name: str
    cls: type

    def build(self, cfg: DestinationConfig, calling_ae_title: str) -> Destination:
        """Every Destination class takes (cfg, calling_ae_title: the listener's AE title)."""
        return self.cls(cfg, calling_ae_title)  # type: ignore[no-any-return]

    def startup(self, dest: Destination) -> int:
        """Clean up what a crash left behind before any worker runs (e.g. partial files);
        returns how many things were removed. Types without such leftovers do nothing."""
        hook: Callable[[], int] | None = getattr(dest, "remove_partial_files", None)
        return hook() if hook is not None else 0


def type_names() -> tuple[str, ...]:
    return tuple(_TYPES)


def handler_for(type_name: str) -> DestinationType:
    """The registered type ``type_name``; ValueError for an unknown one."""
    try:
        module, cls = _TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown destination type {type_name!r}") from None
    return DestinationType(type_name, getattr(importlib.import_module(module), cls))
