"""Profiles, attribute routes and DICOMweb destinations in the configuration: every mistake
exits 2 naming the key; check-config shows each route's effective profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.cli import main
from deid_router.config import load_config

GOOD = """
[storage]
root = "var"

[deid]
secret_file = "var/secret.key"

[profiles.trial]
options = ["retain_long_modified_dates"]
scope = "trial"
pseudonym_prefix = "TRIAL-"

[profiles.teaching]
options = ["clean_descriptors"]

[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"

[[destinations]]
name = "archive"
type = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"

[[routes]]
name = "chest"
destinations = ["outbox"]
profile = "trial"
[routes.match]
StudyDescription = "*CHEST*"
modality = "CT"

[[routes]]
name = "head"
destinations = ["archive"]
profile = "teaching"
[routes.match]
"(0018,0015)" = "HEAD"

[[routes]]
name = "all"
destinations = ["outbox"]
"""


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "router.toml"
    path.write_text(text, encoding="utf-8")
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_config_shows_each_routes_effective_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path, GOOD, capsys)
    assert code == 0, out
    assert "route 'chest': profile 'trial', scope 'trial' -> outbox" in out
    assert "route 'head': profile 'teaching', scope 'teaching' -> archive" in out
    assert "route 'all': profile [deid], scope 'default' -> outbox" in out
    cfg = load_config(tmp_path / "router.toml")
    trial = cfg.profile("trial")
    assert trial.deid.pseudonym_prefix == "TRIAL-" and trial.deid.options == ("retain_long_modified_dates",)
    assert trial.deid.secret_file == cfg.deid.secret_file  # one secret
    assert cfg.destination("archive").url == "http://127.0.0.1:8042/dicom-web"
    assert cfg.routes[1].match == {"(0018,0015)": "HEAD"}


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('scope = "trial"', 'scope = "trial"\noptoins = []', "profiles.trial.optoins"),  # typo in a profile
        ('pseudonym_prefix = "TRIAL-"', 'pseudonym_prefix = "TRIAL-"\nsecret_file = "other.key"',
         "profiles.trial.secret_file"),
        ('options = ["clean_descriptors"]', 'options = ["clean_everything"]', "profiles.teaching.options"),
        ('scope = "trial"', 'scope = "no spaces"', "profiles.trial.scope"),
        ('profile = "trial"', 'profile = "trail"', "routes[0].profile"),
        ('StudyDescription = "*CHEST*"', 'StudyDescripton = "*CHEST*"', "routes[0].match.StudyDescripton"),
        ('StudyDescription = "*CHEST*"', 'ReferencedImageSequence = "*"', "routes[0].match.ReferencedImageSequence"),
        ('StudyDescription = "*CHEST*"', 'StudyDescription = 3', "routes[0].match.StudyDescription"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "http://127.0.0.1:8042/dicom-web"\nurll = "x"',
         "destinations[1].urll"),  # typo in a dicomweb key
        ('url = "http://127.0.0.1:8042/dicom-web"', 'urll = "http://127.0.0.1:8042/dicom-web"', "destinations[1].url"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "ftp://x"', "destinations[1].url"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "http://x"\nusername = "u"', "destinations[1].username"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "http://x"\ntoken_file = "missing.token"',
         "destinations[1].token_file"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "http://x"\nae_title = "PACS"', "destinations[1].ae_title"),
        ('path = "var/outbox"', 'path = "var/outbox"\nurl = "http://x"', "destinations[0].url"),
        ('url = "http://127.0.0.1:8042/dicom-web"', 'url = "http://x"\ninstances_per_request = 0',
         "destinations[1].instances_per_request"),
    ],
)
def test_each_mistake_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, key: str
) -> None:
    assert old in GOOD
    code, out = check(tmp_path, GOOD.replace(old, new, 1), capsys)
    assert code == 2, out
    assert f": {key}: " in out, out
    assert "Traceback" not in out


def test_a_rule_that_weakens_a_profile_is_a_warning_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('pseudonym_prefix = "TRIAL-"\n', 'pseudonym_prefix = "TRIAL-"\n'
                        '[[profiles.trial.rules]]\ntag = "PatientBirthDate"\naction = "keep"\n')
    code, out = check(tmp_path, text, capsys)
    assert code == 0, out
    assert "warning: profiles.trial.rules[0]: action 'keep' on PatientBirthDate weakens the profile" in out
    assert "(profile 'trial')" in out


def test_dicomweb_auth_files_resolve_against_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text("secret\n", encoding="utf-8")
    text = GOOD.replace('url = "http://127.0.0.1:8042/dicom-web"',
                        'url = "http://127.0.0.1:8042/dicom-web/"\nusername = "router"\npassword_file = "pw"')
    code, out = check(tmp_path, text, capsys)
    assert code == 0, out
    dest = load_config(tmp_path / "router.toml").destination("archive")
    assert dest.password_file == tmp_path / "pw" and dest.username == "router"
    assert dest.url == "http://127.0.0.1:8042/dicom-web"
