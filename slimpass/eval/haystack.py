"""Offline text for the long-context tasks: haystacks, word pools and needle values.

Two haystacks:

* ``"repeat"``: the classic filler, five short sentences repeated ("The grass is green. ...").
* ``"natural"``: English prose from CPython's own reference-manual text, ``pydoc_data.topics.topics``,
  which ships with every Python install (so nothing is downloaded). That text is (c) the Python Software
  Foundation and is distributed under the PSF License (Python Software Foundation License Version 2).
  It is cleaned into sentences (indented code and grammar blocks, headings, reST markup such as
  ``**bold**``, ``*emphasis*``, backticks, ``::`` and footnote marks are dropped; sentences with code-like
  symbols are dropped) in sorted topic order. The text differs between Python versions, so a
  "natural" sample is reproducible for a given Python version.

Word pools: real words come from the cleaned natural text; when more distinct words are needed than it
holds, pronounceable nonce words are made from syllables with the caller's seeded RNG.
"""

from __future__ import annotations

import functools
import random
import re
import uuid

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
HAYSTACKS = ("repeat", "natural")

# key words for the magic-number needles ("{adjective}-{noun}"), as RULER draws them from a word list
ADJECTIVES = tuple("""amber ancient bold brave bright calm clever cosmic crimson curious dapper eager
elegant fancy fierce gentle giant glossy golden graceful happy hidden humble icy jolly keen lively
lucky mellow mighty misty modern noble odd orange polite proud quiet rapid rare royal rustic scarlet
shiny silent silver sleepy slim smooth snowy sober solid spicy stormy sunny swift tender tidy tiny
vivid wandering warm wild wise witty young zesty""".split())
NOUNS = tuple("""anchor apple badger banjo beacon bicycle blanket canyon castle cactus comet cookie
crystal dolphin dragon engine falcon feather forest garden giraffe glacier harbor helmet island jacket
kettle lantern lemon meadow mirror monkey mountain needle ocean orchard otter panda parrot pebble
pencil pepper planet pumpkin rabbit river rocket saddle sailor shadow spider sunset teapot thunder
tiger tractor trumpet tulip turtle valley violin walrus wizard""".split())
FIRST_NAMES = tuple("""Adela Bertram Corin Dagny Edric Fenna Gideon Hester Ilario Jorun Kasimir Liesel
Marek Nadira Osric Perpetua Quillon Rosalind Stellan Tamsin Ulrika Valerian Wilhelmina Xaver Yseult
Zoltan""".split())
SURNAMES = tuple("""Ashgrove Brindlecombe Carrow Dunmere Elsworth Fairweather Greystock Holloway
Ironwood Juniper Kettering Larkspur Marchbank Northcott Oakhurst Pennington Quarrie Ravensworth
Stonebridge Thistlewood Underhill Varnham Whitlock Yarrow""".split())
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_TOWN_ENDINGS = ("mere", "wick", "holt", "stead", "brook", "fell", "haven", "moor")

_HEADING = re.compile(r"^[*=\-~^]{3,}$")
_MARKUP = ((re.compile(r"\*\*(.+?)\*\*"), r"\1"), (re.compile(r"\*(\S.*?)\*"), r"\1"), (re.compile(r"`+"), ""),
           (re.compile(r"::"), ":"), (re.compile(r"\[\d+\]"), ""), (re.compile(r"^\* "), ""),
           (re.compile(r"\s+"), " "))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_CODE_CHARS = set("[]{}=<>_|\\@#$%^~*`")
# sentences that could be mistaken for a needle or a question of a task
_RESERVED = ("magic", "pass key", "VAR ", "born", "common words")
_WORD = re.compile(r"\b[a-z]{4,10}\b")


def _prose_paragraph(paragraph: str) -> str | None:
    """One reST paragraph as plain prose, or None for code, grammar, notes and headings (indented or ruled)."""
    lines = paragraph.splitlines()
    if any(line[:1].isspace() for line in lines) or any(_HEADING.match(line.strip()) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text.strip()


def _is_prose_sentence(sentence: str) -> bool:
    """A whole, plain English sentence of moderate length without code symbols or needle-like phrases."""
    return (30 <= len(sentence) <= 400 and (sentence[0].isupper() or sentence[0] == '"') and sentence.endswith(".")
            and not _CODE_CHARS.intersection(sentence) and not any(r in sentence for r in _RESERVED))


def _clean_sentences(topic: str) -> list[str]:
    paragraphs = (_prose_paragraph(p) for p in re.split(r"\n\s*\n", topic))
    return [s for p in paragraphs if p for s in _SENTENCE_END.split(p) if _is_prose_sentence(s)]


@functools.cache
def haystack_sentences(kind: str) -> tuple[str, ...]:
    """The haystack `kind` ("repeat" or "natural") as sentences, one cycle; tasks cycle it as needed."""
    if kind == "repeat":
        return FILLER
    if kind == "natural":
        from pydoc_data.topics import topics

        # several topics repeat the same paragraphs: keep the first occurrence of each sentence
        return tuple(dict.fromkeys(s for name in sorted(topics) for s in _clean_sentences(topics[name])))
    raise ValueError(f"unknown haystack {kind!r}; known: {', '.join(HAYSTACKS)}")


def haystack_text(kind: str) -> str:
    """One cycle of the haystack `kind` ("repeat" or "natural") as text, sentences joined by spaces."""
    return " ".join(haystack_sentences(kind))


@functools.cache
def _words(kind: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The haystack's words and the word index where each sentence starts."""
    sentences = [s.split(" ") for s in haystack_sentences(kind)]
    starts = [0]
    for sentence in sentences[:-1]:
        starts.append(starts[-1] + len(sentence))
    return tuple(w for s in sentences for w in s), tuple(starts)


def filler_words(kind: str, first_sentence: int, count: int) -> list[str]:
    """`count` haystack words starting at sentence `first_sentence` (modulo), cycling the haystack."""
    words, starts = _words(kind)
    offset = starts[first_sentence % len(starts)]
    return [words[(offset + i) % len(words)] for i in range(count)]


@functools.cache
def natural_words() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the natural haystack, in order of first use."""
    return tuple(dict.fromkeys(w for s in haystack_sentences("natural") for w in _WORD.findall(s)))


def nonce_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word such as "bralizou"."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def word_pool(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """`count` distinct words: the natural words in a seeded order, then nonce words when those run out."""
    words = [w for w in natural_words() if w not in exclude]
    rng.shuffle(words)
    seen = set(words) | set(exclude)
    while len(words) < count:
        word = nonce_word(rng)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words[:count]


def town_name(rng: random.Random) -> str:
    """A made-up town name such as "Draloumere" (fictional, so the model cannot know facts about it)."""
    return nonce_word(rng, 2).capitalize() + rng.choice(_TOWN_ENDINGS)


def person_name(rng: random.Random) -> str:
    """A made-up full name such as "Tamsin Larkspur"."""
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"


def word_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "{adjective}-{noun}" keys."""
    picks = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), count)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]


def _numbers(rng: random.Random, count: int) -> list[str]:
    return [str(n) for n in rng.sample(range(10**6, 10**7), count)]


def _uuids(rng: random.Random, count: int) -> list[str]:
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


VALUE_KINDS = {"numbers": _numbers, "words": word_keys, "uuids": _uuids}
"""Needle value kind -> generator of `count` distinct values: 7-digit numbers, word pairs, uuid4 strings."""
