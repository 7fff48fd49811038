"""Orthanc with its DICOMweb plugin as a STOW-RS destination.

What an administrator of the AI archive would see: the mixed pydicom corpus arrives
de-identified; while Orthanc is stopped nothing fails or is quarantined (with max_attempts = 2
and many probes meanwhile: an outage spends no attempts); once it is back everything arrives.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.corpus import make_series
from tests.support.fault_harness import all_job_events, expected_uids, sop_uid
from tests.support.peers import Orthanc, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, wait_until

pytestmark = pytest.mark.e2e


def test_mixed_corpus_over_stow_rs_survives_orthanc_stopping_mid_run(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    require_tool("Orthanc")
    first = tmp_path / "in1"
    first.mkdir()
    for name, src in corpus.items():
        shutil.copyfile(src, first / name)
    first_files = sorted(first.iterdir()) + make_series(first / "ct", 30, rows=16, cols=16)
    second = make_series(tmp_path / "in2", 10, rows=16, cols=16, seed=1)

    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        router = RouterProcess(
            tmp_path / "router",
            [{"name": "archive", "type": "dicomweb", "url": orthanc.dicomweb_url, "instances_per_request": 4,
              "connect_timeout_seconds": 1}],
            queue={"max_attempts": 2, "retry_initial_seconds": 0.2, "retry_max_seconds": 1, "batch_size": 8},
            deid={"burned_in_annotation": "forward"},  # secondary captures carry no BurnedInAnnotation
        )
        with router:
            res = storescu("127.0.0.1", router.port, [first])
            assert storescu_acknowledged(res) == len(first_files), res.stdout + res.stderr
            wait_until(lambda: len(orthanc.instances()) >= 4, 60, 0.1, "the first instances at Orthanc")
            orthanc.pause()  # stopped mid-run: jobs in flight and queued
            res = storescu("127.0.0.1", router.port, [tmp_path / "in2"])
            assert storescu_acknowledged(res) == len(second)  # intake does not depend on the archive
            time.sleep(6)  # many probes: more than max_attempts per job if outages cost attempts
            status = router.status()
            assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0, status
            pending = status["jobs"]["queued"] + status["jobs"]["retrying"] + status["jobs"]["running"]
            assert pending >= len(second), status
            probes = [e for evs in all_job_events(router).values() for e in evs if e.from_state == "running"]
            refused = [e for e in probes if e.reason == "connection_refused"]
            assert len(refused) > 2, {e.reason for e in probes}
            orthanc.resume()
            everything = first_files + second
            status = router.wait_idle(180, expect_done=len(everything))
            assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0, status
            expected = expected_uids(router, everything)
            assert set(orthanc.sop_instance_uids()) == expected
            originals = {sop_uid(p) for p in everything}
            assert not originals & expected
            for instance in orthanc.instances():
                tags = orthanc.tags(instance)
                assert tags.get("PatientIdentityRemoved") == "YES"
                assert tags.get("SOPInstanceUID") not in originals
    finally:
        orthanc.close()
