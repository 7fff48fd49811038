"""The written forms of one instance's identifiers: the one place that decides what counts as
"the same identifier written differently".

Cleaning (``deid/clean.py``, the C action) and the residual scan (``deid/residual.py``) both
match through ``Forms``, so what the cleaner removes and what the scan looks for cannot drift
apart. The forms are:

* dates: every DA/DT date of the instance in the usual numeric orders and separators
  (``19470315``, ``15/03/1947``, ``15.3.47``, ``3/15/1947``, ``1947-03-15``), spelled
  (``March 15, 1947``, ``15 Mar 1947``, ``15th of March 1947``, ``1947-Mar-15``) and CJK
  (``1947年3月15日``, ``1947년 3월 15일``). One pattern compiled at import finds date-like text;
  a match counts when it parses to one of the instance's dates.
* IDs (a value with a digit, letters and digits only once separators are dropped): with or
  without separators between any characters (``1234567``, ``12-34-567``, ``123 4567``), and
  glued to a prefix (``MRN1234567``).
* names: each component of each PN group (alphabetic, ideographic, phonetic), in any order;
  for CJK groups also family+given written together; kana in hiragana and katakana; Latin
  letters with and without accents.
* institution-like values (several words): the whole value with any spacing, and each
  distinctive word (not ``Hospital``, ``University``...).

Text is compared decoded (case-insensitive). ``Forms.search_bytes`` also finds the non-ASCII
forms in raw bytes, in every character set a DICOM instance may declare (UTF-8, ISO 8859,
ISO 2022 JIS X 0208 / KS X 1001 / GB 2312, GB18030), for values whose declared character set
does not match their bytes and private values pydicom cannot decode.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

GENERIC = frozenset({
    "YES", "NO", "NONE", "NULL", "UNKNOWN", "ANONYMOUS", "ANONYMIZED", "REMOVED", "MALE", "FEMALE",
    "OTHER", "TRUE", "FALSE", "ANON", "TEST", "DEID", "PATIENT", "HOSPITAL", "DOCTOR", "MR", "MRS", "DR",
    "NAME", "ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY", "AXIAL", "LOCALIZER", "IMAGE",
})
# Words of institution names and addresses that identify nobody on their own.
INSTITUTION_WORDS = frozenset({
    "THE", "OF", "AND", "FOR", "DE", "DER", "DES", "DU", "LA", "LE", "DI", "DEL", "UND", "ET", "AM", "IM",
    "HOSPITAL", "HOSPITALS", "GENERAL", "MEDICAL", "MEDICINE", "CENTER", "CENTRE", "CLINIC", "CLINICS",
    "KLINIK", "KLINIKUM", "KLINIKEN", "KRANKENHAUS", "UNIVERSITY", "UNIVERSITAT", "UNIVERSITY'S",
    "INSTITUTE", "INSTITUT", "HEALTH", "HEALTHCARE", "CARE", "REGIONAL", "COMMUNITY", "COUNTY", "CITY",
    "NATIONAL", "ROYAL", "SAINT", "ST", "DEPARTMENT", "DEPT", "RADIOLOGY", "IMAGING", "DIAGNOSTIC",
    "DIAGNOSTICS", "SERVICES", "SERVICE", "SYSTEM", "GROUP", "NORTH", "SOUTH", "EAST", "WEST", "NORD",
    "SUD", "OST", "CHILDREN", "CHILDREN'S", "CHILDRENS", "WOMEN", "UNIT", "STREET", "ROAD", "AVENUE",
    "PRACTICE", "PRIVATE", "FOUNDATION", "TRUST", "NHS", "CENTRAL", "MEMORIAL", "SCHOOL", "COLLEGE",
    "ONCOLOGY", "CARDIOLOGY", "NEUROLOGY", "SURGERY", "EMERGENCY", "OUTPATIENT", "INPATIENT", "WARD",
})
_SPLIT_NAME = re.compile(r"[\^=,\s]+")
_WORDS = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
_ID_SEPARATORS = re.compile(r"[\s\-./_()+]+")
_SEP = r"[\s\-./_()+]{0,3}"
_ALNUM_L = r"(?<![0-9A-Za-z])"
_ALNUM_R = r"(?![0-9A-Za-z])"


# ---------------------------------------------------------------------------------------- names
def _is_cjk_or_kana(text: str) -> bool:
    if text.isascii():
        return False
    return any(unicodedata.east_asian_width(c) in ("W", "F") for c in text)


def _long_enough(part: str) -> bool:
    """ASCII components of three letters or more; CJK/other scripts from two characters."""
    if part.upper() in GENERIC:
        return False
    return len(part) >= (3 if part.isascii() else 2)


def name_parts(value: str) -> list[str]:
    """Components of a PN in each of its groups (family, given, middle...), plus, for CJK
    groups, family and given written together (``山田太郎``) as names are in running text."""
    parts = [p for p in _SPLIT_NAME.split(value) if _long_enough(p)]
    if value.isascii():
        return parts
    for group in value.split("="):
        comps = [c for c in group.split("^")[:2] if c.strip()]
        if len(comps) == 2 and _is_cjk_or_kana(group):
            joined = comps[0].strip() + comps[1].strip()
            parts += [joined, comps[1].strip() + comps[0].strip()]
    return parts


def words(value: str) -> list[str]:
    """Distinctive words of an institution name or address (``Riverside`` of ``Riverside
    Mercy Hospital``): three letters or more, or four digits or more, not a generic word."""
    out = []
    for w in _WORDS.findall(value):
        if w.upper() in INSTITUTION_WORDS or w.upper() in GENERIC:
            continue
        if w.isdigit():
            if len(w) >= 4:
                out.append(w)
        elif len(w) >= (3 if w.isascii() else 2):
            out.append(w)
    return out


def _kana_swapped(text: str) -> str:
    """Hiragana as katakana and katakana as hiragana."""
    out = []
    for c in text:
        o = ord(c)
        if 0x3041 <= o <= 0x3096:
            out.append(chr(o + 0x60))
        elif 0x30A1 <= o <= 0x30F6:
            out.append(chr(o - 0x60))
        else:
            out.append(c)
    return "".join(out)


def _unaccented(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def spellings(literal: str) -> set[str]:
    """The same text in the other scripts it is commonly written in (kana, accents, width)."""
    found = {literal, unicodedata.normalize("NFKC", literal)}
    if not literal.isascii():
        found.add(_kana_swapped(literal))
        found.add(_unaccented(literal))
    return {s for s in found if s}


# ---------------------------------------------------------------------------------------- IDs
def id_like(value: str) -> bool:
    """A value written like an ID: one word (or digits and separators only) with a digit, >= 4
    letters and digits once separators go. ``Thorax 1.0 B70f`` is a description, not an ID."""
    v = value.strip()
    bare = _ID_SEPARATORS.sub("", v)
    if len(bare) < 4 or not bare.isascii() or not bare.isalnum() or not any(c.isdigit() for c in bare):
        return False
    return bare.isdigit() or not any(c.isspace() for c in v)


def bare_id(value: str) -> str:
    """An ID without its separators: how the scan compares IDs (``12-34-567`` -> ``1234567``)."""
    return _ID_SEPARATORS.sub("", value.strip())


def _id_fragment(bare: str) -> str:
    """An ID with optional separators between any two characters, for removal from text."""
    left = r"(?<!\d)" if bare[0].isdigit() else _ALNUM_L
    right = r"(?!\d)" if bare[-1].isdigit() else _ALNUM_R
    return left + _SEP.join(re.escape(c) for c in bare) + right


def _text_fragment(literal: str) -> str:
    """A name, word or value in each of its spellings, any spacing between its words."""
    return "|".join(r"\s+".join(re.escape(w) for w in s.split())
                    for s in sorted(spellings(literal), key=lambda x: (-len(x), x)))


# ---------------------------------------------------------------------------------------- dates
_MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4,
    "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9,
    "sept": 9, "sep": 9, "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12,
    # German and French month names (the forms differing from the English ones)
    "januar": 1, "jänner": 1, "februar": 2, "märz": 3, "maerz": 3, "mai": 5, "juni": 6, "juli": 7,
    "oktober": 10, "okt": 10, "dezember": 12, "dez": 12, "janvier": 1, "février": 2, "fevrier": 2,
    "mars": 3, "avril": 4, "juin": 6, "juillet": 7, "août": 8, "aout": 8, "septembre": 9, "octobre": 10,
    "novembre": 11, "décembre": 12, "decembre": 12,
}
_MONTH = "|".join(sorted(_MONTHS, key=lambda m: (-len(m), m)))
_ORD = r"(?:st|nd|rd|th|er|e|\.)?"
_GAP = r"[\s\-./,']*"
DATE_RE = re.compile(
    r"(?<!\d)(?P<a>\d{1,4})(?P<s>[-./ ])(?P<b>\d{1,2})(?P=s)(?P<c>\d{4}|\d{2})(?!\d)"
    r"|(?<!\d)(?P<y8>\d{4})(?P<m8>\d{2})(?P<d8>\d{2})(?:\d{2,6}(?:\.\d{1,6})?)?(?!\d)"
    rf"|(?<![^\W\d_])(?<!\d)(?P<d1>\d{{1,2}}){_ORD}(?:\s*of)?{_GAP}(?P<m1>{_MONTH})(?![^\W\d_])\.?{_GAP}"
    r"(?P<y1>\d{4}|\d{2})(?!\d)"
    rf"|(?<![^\W\d_])(?P<m2>{_MONTH})(?![^\W\d_])\.?{_GAP}(?P<d2>\d{{1,2}}){_ORD}{_GAP}(?P<y2>\d{{4}}|\d{{2}})(?!\d)"
    rf"|(?<!\d)(?P<y3>\d{{4}}){_GAP}(?P<m3>{_MONTH})(?![^\W\d_])\.?{_GAP}(?P<d3>\d{{1,2}})(?!\d)"
    r"|(?<!\d)(?P<y4>\d{4})\s*[年년]\s*(?P<m4>\d{1,2})\s*[月월]\s*(?P<d4>\d{1,2})\s*[日일]?",
    re.IGNORECASE,
)
Date = tuple[int, int, int]
# the longest written forms: "15th of September, 1947" before the year, "1947-September-15th" after
_BEFORE_YEAR = 40
_AFTER_YEAR = 28


def parse_date(value: str) -> Date | None:
    """(year, month, day) of the date part of a DA or DT value; None if it has no full date."""
    v = value.strip()[:8]
    if len(v) != 8 or not v.isdigit():
        return None
    y, m, d = int(v[:4]), int(v[4:6]), int(v[6:])
    if not (1 <= m <= 12 and 1 <= d <= 31):
        return None
    return (y, m, d)


def date_spellings(da: str) -> list[str]:
    """A DA value in its common literal spellings, for matchers that take plain strings (OCR)."""
    p = parse_date(da)
    if p is None:
        return [da.strip()] if len(da.strip()) >= 4 else []
    y, m, d = f"{p[0]:04d}", f"{p[1]:02d}", f"{p[2]:02d}"
    return [y + m + d, f"{d}.{m}.{y}", f"{y}-{m}-{d}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"]


def _candidates(m: re.Match[str]) -> list[tuple[int, int, int, bool]]:
    """(year, month, day, two-digit year) readings of one date-like match."""
    g = m.groupdict()
    out: list[tuple[int, int, int, bool]] = []

    def add(y: str, mo: str | int, d: str) -> None:
        month = mo if isinstance(mo, int) else int(mo)
        out.append((int(y), month, int(d), len(y) == 2))

    if g["a"] is not None:
        a, b, c = g["a"], g["b"], g["c"]
        if len(a) == 4:
            if len(c) <= 2:
                add(a, b, c)
        elif len(a) <= 2:
            add(c, b, a)  # day first
            add(c, a, b)  # month first
    elif g["y8"] is not None:
        add(g["y8"], g["m8"], g["d8"])
    else:
        for y, mo, d in (("y1", "m1", "d1"), ("y2", "m2", "d2"), ("y3", "m3", "d3")):
            if g[mo] is not None:
                add(g[y], _MONTHS[g[mo].lower()], g[d])
                return out
        if g["y4"] is not None:
            add(g["y4"], g["m4"], g["d4"])
    return out


class _Dates:
    """The instance's dates and a cheap pre-check: every written form holds the year's last two digits."""

    __slots__ = ("full", "short", "years")

    def __init__(self, dates: Iterable[str]) -> None:
        parsed = {p for p in (parse_date(d) for d in dates) if p is not None}
        self.full = parsed
        self.short = {(y % 100, m, d) for y, m, d in parsed}
        self.years = tuple({f"{y % 100:02d}" for y, _m, _d in parsed})

    def _hit(self, m: re.Match[str]) -> bool:
        for y, mo, d, short in _candidates(m):
            if (y, mo, d) in self.full or (short and (y, mo, d) in self.short):
                return True
        return False

    def _windows(self, text: str) -> list[tuple[int, int]]:
        """Stretches of ``text`` around each occurrence of a year's last two digits: the only
        places a date of the instance can be written (the pattern is then run there only:
        100 KB of report text in 15 ms instead of 250 ms)."""
        spots: list[int] = []
        for y in self.years:
            i = text.find(y)
            while i >= 0:
                spots.append(i)
                i = text.find(y, i + 1)
        spots.sort()
        n = len(text)
        out: list[tuple[int, int]] = []
        for i in spots:
            start, end = max(0, i - _BEFORE_YEAR), min(n, i + 2 + _AFTER_YEAR)
            while end < n and text[end].isalnum():  # the pattern's look-ahead must see what follows
                end += 1
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(end, out[-1][1]))
            else:
                out.append((start, end))
        return out

    def spans(self, text: str, first_only: bool = False) -> list[tuple[int, int]]:
        """Where the instance's dates are written in ``text`` (overlapping reads are tried)."""
        if not self.full or not any(y in text for y in self.years):
            return []
        found: list[tuple[int, int]] = []
        search = DATE_RE.search
        for start, end in self._windows(text):
            pos = start
            while True:
                m = search(text, pos, end)
                if m is None:
                    break
                if self._hit(m):
                    found.append(m.span())
                    if first_only:
                        return found
                    pos = m.end()
                else:
                    pos = m.start() + 1
        return found


# ---------------------------------------------------------------------------------------- bytes
_ISO2022_RUN = rb"\x1b\$[B@](?:[\x21-\x7e]{2})*?"
_BYTE_CODECS = ("utf_8", "latin_1", "iso8859_2", "iso8859_5", "iso8859_7", "iso8859_8", "iso8859_9",
                "cp1252", "euc_kr", "gb2312", "gbk", "gb18030", "shift_jis", "euc_jp")


def encoded_forms(literal: str) -> list[bytes]:
    """Regular expressions (bytes) for a non-ASCII literal in the character sets of DICOM."""
    out: list[bytes] = []
    for s in {literal, literal.upper(), literal.lower()}:
        for codec in _BYTE_CODECS:
            try:
                out.append(re.escape(s.encode(codec)))
            except UnicodeEncodeError:
                pass
        try:
            jis = s.encode("iso2022_jp")
        except UnicodeEncodeError:
            continue
        # inside a JIS X 0208 run the characters are 7-bit pairs after ESC $ B
        body = jis.replace(b"\x1b$B", b"").replace(b"\x1b(B", b"").replace(b"\x1b(J", b"")
        if body != s.encode("ascii", "ignore"):
            out.append(_ISO2022_RUN + re.escape(body))
    return out


# ---------------------------------------------------------------------------------------- forms
_FORMS_CACHE: dict[tuple[frozenset[str], frozenset[str], frozenset[str]], Forms] = {}
_FORMS_CACHE_MAX = 256
def forms(literals: Iterable[str], dates: Iterable[str] = (), exact: Iterable[str] = ()) -> Forms:
    """``Forms`` of these identifiers; the instances of one series share theirs, so they are
    built once (building costs about 0.1 ms, more than the search it serves)."""
    key = (frozenset(literals), frozenset(dates), frozenset(exact))
    found = _FORMS_CACHE.get(key)
    if found is None:
        if len(_FORMS_CACHE) >= _FORMS_CACHE_MAX:
            _FORMS_CACHE.clear()
        found = _FORMS_CACHE[key] = Forms(*key)
    return found


class Forms:
    """Every written form of a set of identifiers: ``search`` (the scan), ``remove`` (cleaning).

    The scan searches IDs in the text with its separators squeezed out, against the bare IDs:
    one alternation of literals, which the regular-expression engine skips through about ten
    times faster than IDs with optional separators between characters (measured on a CT
    header: 8 us against 90 us). Removal needs the positions, and uses those.
    """

    __slots__ = ("_re", "_ids", "_id_remove", "_dates", "_bytes", "has_bytes")

    def __init__(self, literals: Iterable[str], dates: Iterable[str] = (), exact: Iterable[str] = ()) -> None:
        """``exact``: values matched as written (spacing and spelling aside), not as IDs: the
        weak values of the scan, where ``Ver 1.23.45`` must not count as a removed ``12345``."""
        uniq = sorted({s.strip() for s in literals if s.strip()}, key=lambda s: (-len(s), s))
        ids = sorted({bare_id(s) for s in uniq if id_like(s)}, key=lambda s: (-len(s), s))
        texts = sorted({s for s in uniq if not id_like(s)} | {s.strip() for s in exact if s.strip()},
                       key=lambda s: (-len(s), s))
        self._re = (re.compile(f"{_ALNUM_L}(?:{'|'.join(_text_fragment(s) for s in texts)}){_ALNUM_R}",
                               re.IGNORECASE) if texts else None)
        self._ids = (re.compile(f"(?<!\\d)(?:{'|'.join(ids)})(?!\\d)", re.IGNORECASE) if ids else None)
        self._id_remove = (re.compile("|".join(f"(?:{_id_fragment(b)})" for b in ids), re.IGNORECASE)
                           if ids else None)
        self._dates = _Dates(dates)
        foreign = [b for s in texts if not s.isascii() for b in encoded_forms(s)]
        self._bytes = re.compile(b"|".join(foreign)) if foreign else None
        self.has_bytes = self._bytes is not None

    def __bool__(self) -> bool:
        return self._re is not None or self._ids is not None or bool(self._dates.full)

    def search(self, text: str) -> bool:
        """Whether ``text`` holds one of the identifiers in any written form."""
        if self._re is not None and self._re.search(text):
            return True
        if self._ids is not None and self._ids.search(_ID_SEPARATORS.sub("", text)):
            return True
        return bool(self._dates.spans(text, first_only=True))

    def search_bytes(self, data: bytes) -> bool:
        """Whether raw ``data`` holds a non-ASCII identifier in any DICOM character set."""
        return self._bytes is not None and self._bytes.search(data) is not None

    def remove(self, text: str) -> str:
        """``text`` without any of the identifiers (IDs first: one may hold a date, then dates,
        then names and words)."""
        out = text
        if self._id_remove is not None:
            out = self._id_remove.sub("", out)
        for start, end in reversed(self._dates.spans(out)):
            out = out[:start] + out[end:]
        if self._re is not None:
            out = self._re.sub("", out)
        return out
