"""Destination types: each registers its config model, its Destination class and whether its
connections are leased.

A new type is one model (in ``targets.py``), one module with its Destination, and one line in
``_TYPES`` below (after mercure's ``dispatch/target_types/registry.py``). ``config.py``
validates every ``[[destinations]]`` table against the union of the registered models; nothing
else in the node asks which type a destination is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from deid_router.config import DestinationConfig
from deid_router.forward.targets import DestinationTable, DicomTarget, DicomwebTarget, FolderTarget

if TYPE_CHECKING:
    from deid_router.forward.base import Destination


@dataclass(frozen=True)
class DestinationType:
    model: type[DestinationTable]  # its [[destinations]] table; the type name is the model's
    module: str  # imported when the type is used (pynetdicom, httpx: not for check-config)
    class_name: str
    leased: bool  # a remote service: its associations are bounded node- and cluster-wide

    @property
    def name(self) -> str:
        return self.model.type_name()

    @property
    def cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)  # type: ignore[no-any-return]

    def build(self, cfg: DestinationConfig, calling_ae_title: str) -> Destination:
        """Every Destination class takes (cfg, calling_ae_title: the listener's AE title)."""
        return self.cls(cfg, calling_ae_title)  # type: ignore[no-any-return]

    def startup(self, dest: Destination) -> int:
        """Clean up what a crash left behind before any worker runs (e.g. partial files);
        returns how many things were removed. Types without such leftovers do nothing."""
        hook: Callable[[], int] | None = getattr(dest, "remove_partial_files", None)
        return hook() if hook is not None else 0


_TYPES: dict[str, DestinationType] = {
    t.name: t
    for t in (
        DestinationType(DicomTarget, "deid_router.forward.dicom", "DicomDestination", leased=True),
        DestinationType(FolderTarget, "deid_router.forward.folder", "FolderDestination", leased=False),
        DestinationType(DicomwebTarget, "deid_router.forward.dicomweb", "DicomwebDestination", leased=True),
    )
}


def types() -> tuple[DestinationType, ...]:
    return tuple(_TYPES.values())


def type_names() -> tuple[str, ...]:
    return tuple(_TYPES)


def destination_table() -> Any:
    """The type of one ``[[destinations]]`` table: the registered models, told apart by ``type``."""
    return Annotated[Union[tuple(t.model for t in _TYPES.values())], Field(discriminator="type")]  # noqa: UP007


def handler_for(type_name: str) -> DestinationType:
    """The registered type ``type_name``; ValueError for an unknown one."""
    try:
        return _TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown destination type {type_name!r}") from None
