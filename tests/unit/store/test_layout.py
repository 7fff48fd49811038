"""The layout module builds every output path from UIDs and refuses anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.errors import UnsafePathError
from deid_router.store import layout


def test_instance_path_is_study_series_sop_under_the_root(tmp_path: Path) -> None:
    assert layout.instance_path(tmp_path, "1.2.3", "1.2.4", "1.2.5") == tmp_path / "1.2.3" / "1.2.4" / "1.2.5.dcm"
    assert layout.temp_path(tmp_path).parent == tmp_path
    copy, reason = layout.quarantine_paths(tmp_path)
    assert copy.parent == reason.parent == tmp_path and copy.stem == reason.name.split(".")[0]


@pytest.mark.parametrize("hostile", ["../../x", "..", "", "1.2/3", "/etc", "1.2.3\0", "1." + "2" * 64, "1.2.", "a.b"])
def test_non_uids_are_refused(tmp_path: Path, hostile: str) -> None:
    for study, series, sop in ((hostile, "1.2", "1.3"), ("1.1", hostile, "1.3"), ("1.1", "1.2", hostile)):
        with pytest.raises(UnsafePathError) as err:
            layout.instance_path(tmp_path, study, series, sop)
        assert hostile not in str(err.value) or not hostile
