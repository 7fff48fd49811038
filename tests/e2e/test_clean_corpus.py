"""The clean options end to end: a real node with the three clean options receives the clean
corpus from dcmtk storescu and writes it to a folder destination. Every instance is delivered
(none quarantined) and no identifier survives in any written form in the files written."""

from __future__ import annotations

from pathlib import Path

import pydicom

from deid_router.deid.keys import Keys
from tests.support import clean_corpus as cc
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.router import RouterProcess

CLEAN_OPTIONS = ["clean_descriptors", "clean_structured_content", "clean_graphics"]
PER_KIND = 2


def test_clean_corpus_through_a_node_is_delivered_without_identifiers(tmp_path: Path) -> None:
    corpus = cc.write_corpus(tmp_path / "in", per_kind=PER_KIND)
    sent = sum(len(paths) for paths in corpus.values())
    router = RouterProcess(
        tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}],
        deid={"options": CLEAN_OPTIONS},
    )
    with router:
        res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
        assert storescu_acknowledged(res) == sent, res.stdout[-3000:] + res.stderr[-3000:]
        status = router.wait_idle(120)
    keys = Keys.load_or_create(router.secret_path)
    kind_of = {
        keys.uid(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)): kind
        for kind, paths in corpus.items() for p in paths
    }
    delivered: dict[str, int] = {kind: 0 for kind in corpus}
    found_leaks: dict[str, list[str]] = {}
    for f in sorted((router.workdir / "var" / "outbox").rglob("*.dcm")):
        kind = kind_of[f.stem]
        delivered[kind] += 1
        leaked = cc.leaks(f.read_bytes(), cc.forms_of(kind))
        if leaked:
            found_leaks[f"{kind}/{f.name}"] = leaked
    quarantined = {kind: len(corpus[kind]) - delivered[kind] for kind in corpus}
    counts = {kind: (delivered[kind], quarantined[kind]) for kind in corpus}
    print("delivered/quarantined per kind:", counts)  # the figures of the report (pytest -s)
    assert status["quarantined"] == 0, (counts, router.log_text()[-3000:])
    assert all(q == 0 for q in quarantined.values()), counts
    assert delivered == {kind: PER_KIND for kind in corpus}
    assert found_leaks == {}
