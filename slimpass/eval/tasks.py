"""Offline long-context tasks (RULER-style), generated from a seed and a target prompt length.

    sample = make_sample("niah_single", tokenizer, length=4096, seed=3, haystack="natural")
    sample.input_ids      # [1, N], N <= 4096 and within max(5%, 64) tokens of it
    score(sample, model_answer_text)

Families (`TASKS`): ``passkey``; ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
``niah_multiquery`` ("One of the special magic {values} for {key} is: {value}."; option ``values`` =
``numbers`` | ``words`` | ``uuids``); ``variable_tracking`` ("VAR ABCDE = 12345." chains, option ``hops``);
``common_words`` (a numbered word list; the 10 most frequent words are the answer); ``qa`` (a fictional
fact about a made-up person and town, asked in plain words). Every prompt is one user message rendered
with the tokenizer's chat template and ``add_generation_prompt=True``. Options and their defaults are in
`_FAMILIES`. `depth` places the (first) queried needle; distractors and further needles get seeded depths;
a variable-tracking chain starts at `depth` and continues after it; ``common_words`` has no haystack.

Haystacks come from `slimpass.eval.haystack`: ``"repeat"`` filler or ``"natural"`` prose from CPython's
``pydoc_data.topics`` (PSF License; it ships with Python, so nothing is downloaded). The haystack is
measured in words; the largest word count whose prompt fits `length` tokens is found by an
interpolating bisection over the exact token count, so prompts never exceed `length` and fall short
of it by a few tokens (``exact=True`` tops them up to `length` with the first tokens of the haystack's
continuation, spliced in before the question, so that prompts of one length batch without padding). Needles are placed at sentence boundaries nearest their depth.

Token ids are those of ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`` on the
rendered template text; the offsets map each needle's character range to its token range
(`Sample.needle_spans`). For SmolLM2 these ids equal ``apply_chat_template(..., tokenize=True)`` (a test
checks this); tokenizers whose template tokenizes differently still get self-consistent ids and spans.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import random
import string
from collections.abc import Callable
from typing import Any

import torch

from slimpass.eval import haystack as hs
from slimpass.eval.haystack import haystack_text

__all__ = ["TASKS", "Sample", "make_sample", "make_samples", "score", "haystack_text"]

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "qa")
_SENTENCE_ENDS = (".", "!", "?")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise is ambiguous
class Sample:
    """One prompt with its expected answers; `needle_spans` are [start, end) token ranges in `input_ids`."""

    task: str
    input_ids: torch.Tensor
    answers: tuple[str, ...]
    needle_spans: tuple[tuple[int, int], ...]
    metric: str
    seed: int
    length: int
    info: dict

    @property
    def needle_positions(self) -> set[int]:
        """Every token position of every needle (what must survive pruning)."""
        return {p for start, end in self.needle_spans for p in range(start, end)}


@dataclasses.dataclass(frozen=True)
class _Placed:
    """A sentence put into the haystack at a relative depth; `needle` marks those that carry the answer."""

    text: str
    depth: float
    needle: bool = True


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a task family builds before fitting: the words around the context and what goes into it."""

    preamble: str
    question: str
    answers: tuple[str, ...]
    metric: str
    placed: tuple[_Placed, ...] = ()
    filler: Callable[[int], list[str]] | None = None  # n -> context units; None: n haystack words
    sep: str = " "
    info: dict = dataclasses.field(default_factory=dict)


_METRICS = {"all": lambda hits: sum(hits) / len(hits), "part": lambda hits: float(any(hits))}


def score(sample: Sample, prediction: str) -> float:
    """RULER string match, case-insensitive: 'all' = mean over answers of (answer in prediction); 'part' = max."""
    text = prediction.lower()
    return _METRICS[sample.metric]([answer.lower() in text for answer in sample.answers])


# ---- task families: (rng, depth, length, **options) -> _Spec ---------------------------------------

def _spread(rng: random.Random, depth: float, count: int) -> list[float]:
    """`depth` for the first item, seeded uniform depths for the others."""
    return [depth] + [rng.random() for _ in range(count - 1)]


def _passkey(rng: random.Random, depth: float, length: int) -> _Spec:
    key = str(rng.randrange(10**4, 10**5))
    return _Spec(
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "it. I will quiz you about the important information there.",
        question="What is the pass key?", answers=(key,), metric="all",
        placed=(_Placed(f"The pass key is {key}. Remember it. {key} is the pass key.", depth),))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _niah(rng: random.Random, depth: float, length: int, *, values: str, num_keys: int, num_values: int,
          num_queries: int) -> _Spec:
    if values not in hs.VALUE_KINDS or not 1 <= num_queries <= num_keys or num_values < 1:
        raise ValueError(f"niah options: values in {sorted(hs.VALUE_KINDS)}, 1 <= num_queries <= num_keys, "
                         f"num_values >= 1 (got {values!r}, {num_queries}, {num_keys}, {num_values})")
    keys = hs.word_keys(rng, num_keys)
    pool = [v for v in hs.VALUE_KINDS[values](rng, num_keys * num_values + num_keys) if v not in keys]
    table = {key: pool[i * num_values:(i + 1) * num_values] for i, key in enumerate(keys)}
    queries = keys[:num_queries]
    needles = [(key, value) for key in keys for value in table[key]]  # queried keys first
    depths = _spread(rng, depth, len(needles))
    placed = tuple(_Placed(f"One of the special magic {values} for {key} is: {value}.", d, key in queries)
                   for (key, value), d in zip(needles, depths))
    return _Spec(
        preamble=f"Some special magic {values} are hidden within the following text. Make sure to "
                 f"memorize it. I will quiz you about the {values} afterwards.",
        question=f"What are all the special magic {values} for {_and(queries)} mentioned in the provided text?",
        answers=tuple(v for key in queries for v in table[key]), metric="all", placed=placed,
        info={"values": values, "keys": keys})


def _variable_tracking(rng: random.Random, depth: float, length: int, *, hops: int, chains: int) -> _Spec:
    if hops < 1 or chains < 1:
        raise ValueError(f"variable_tracking needs hops >= 1 and chains >= 1 (got {hops}, {chains})")
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    literals = [str(v) for v in rng.sample(range(10**4, 10**5), chains)]
    placed = []
    for c, literal in enumerate(literals):  # chain 0 is asked about; the others are distractors
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        start = depth if c == 0 else rng.random()
        depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(hops))
        texts = [f"VAR {chain[0]} = {literal}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        placed += [_Placed(t, d, c == 0) for t, d in zip(texts, depths)]
    return _Spec(
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {literals[0]} in the text above.",
        answers=tuple(names[:hops + 1]), metric="all", placed=tuple(placed), info={"hops": hops})


def _common_words(rng: random.Random, depth: float, length: int, *, num_common: int,
                  common_freq: int | None, rare_freq: int | None) -> _Spec:
    common_freq = common_freq or min(30, max(3, length // 128))
    rare_freq = rare_freq or min(3, max(1, common_freq // 10))
    if not 1 <= rare_freq < common_freq or num_common < 1:
        raise ValueError(f"common_words needs 1 <= rare_freq < common_freq and num_common >= 1 "
                         f"(got {rare_freq}, {common_freq}, {num_common})")
    common = hs.word_pool(rng, num_common)
    pool_seed = rng.random()

    def filler(n: int) -> list[str]:  # the rare words for n are a prefix of those for any larger n
        words = common * common_freq + hs.word_pool(random.Random(pool_seed), n, set(common)) * rare_freq
        random.Random(f"{pool_seed}:{n}").shuffle(words)
        return [f"{i}. {word}" for i, word in enumerate(words, 1)]

    return _Spec(
        preamble="Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.",
        question=f"Question: What are the {num_common} most common words in the above list?",
        answers=tuple(common), metric="all", filler=filler, sep="\n",
        info={"common_freq": common_freq, "rare_freq": rare_freq})


_FACTS = (  # (fact, question): the answer is always the town
    ("{name} was born in the town of {town}, where the river bends twice before it reaches the sea.",
     "In which town was {name} born?"),
    ("{name} grew up in the town of {town} and later opened a small bakery near its old bridge.",
     "In which town did {name} grow up?"),
    ("{name} spent twenty quiet years as the librarian of the town of {town}.",
     "Of which town was {name} the librarian?"),
)


def _qa(rng: random.Random, depth: float, length: int) -> _Spec:
    name, town = hs.person_name(rng), hs.town_name(rng)
    fact, question = rng.choice(_FACTS)
    return _Spec(
        preamble="Answer the question based on the given text. Only give me the answer and do not output "
                 "any other words.",
        question=f"Question: {question.format(name=name)}", answers=(town,), metric="part",
        placed=(_Placed(fact.format(name=name, town=town), depth),), info={"name": name})


_NIAH = {"values": "numbers", "num_keys": 1, "num_values": 1, "num_queries": 1}
_FAMILIES: dict[str, tuple[Callable[..., _Spec], dict[str, Any]]] = {
    "passkey": (_passkey, {}),
    "niah_single": (_niah, _NIAH),
    "niah_multikey": (_niah, {**_NIAH, "num_keys": 4}),
    "niah_multivalue": (_niah, {**_NIAH, "num_values": 4}),
    "niah_multiquery": (_niah, {**_NIAH, "num_keys": 4, "num_queries": 4}),
    "variable_tracking": (_variable_tracking, {"hops": 4, "chains": 2}),
    "common_words": (_common_words, {"num_common": 10, "common_freq": None, "rare_freq": None}),
    "qa": (_qa, {}),
}
assert tuple(_FAMILIES) == TASKS


# ---- layout, rendering and fitting ------------------------------------------------------------------

def _layout(units: list[str], placed: tuple[_Placed, ...]) -> list[tuple[str, bool]]:
    """Units with the placed sentences inserted at the sentence boundary nearest each one's depth (never after
    the trailing part-sentence where the haystack was cut)."""
    n = len(units)
    bounds = [i for i in range(n + 1) if i == 0 or units[i - 1].endswith(_SENTENCE_ENDS)]
    slots: dict[int, list[_Placed]] = {}
    for item in placed:
        target = item.depth * n
        k = bisect.bisect_left(bounds, target)
        nearest = min(bounds[max(k - 1, 0):k + 1], key=lambda b: abs(b - target))
        slots.setdefault(nearest, []).append(item)
    out: list[tuple[str, bool]] = []
    for i in range(n + 1):
        out += [(item.text, item.needle) for item in slots.get(i, ())]
        out += [(units[i], False)] if i < n else []
    return out


@dataclasses.dataclass(frozen=True)
class _Rendered:
    ids: list[int]
    spans: tuple[tuple[int, int], ...]
    haystack_end: int  # the index of the first token after the haystack (before the question)


def _render(tokenizer, spec: _Spec, units: list[str]) -> _Rendered:
    """Template text -> token ids (with offsets) -> token spans of the needle sentences."""
    pieces, needles, at = [], [], len(spec.preamble) + 2
    for text, needle in _layout(units, spec.placed):
        needles += [(at, at + len(text))] if needle else []
        pieces.append(text)
        at += len(text) + len(spec.sep)
    content = f"{spec.preamble}\n\n{spec.sep.join(pieces)}\n\n{spec.question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    base = text.find(content)
    if base < 0:
        raise ValueError("the tokenizer's chat template changes the user message; cannot locate the needles")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts, ends = zip(*enc["offset_mapping"]) if enc["input_ids"] else ((), ())
    spans = tuple((bisect.bisect_right(ends, base + a), bisect.bisect_left(starts, base + b)) for a, b in needles)
    end = base + (at - len(spec.sep) if pieces else at)  # where the haystack's text ends
    return _Rendered(list(enc["input_ids"]), spans, bisect.bisect_left(starts, end))


def _fit(count: Callable[[int], int], length: int) -> int:
    """Largest n with count(n) <= length, for count increasing in n: extrapolate (to 60%, then just past the
    target), then narrow by interpolation, bisecting after two probes in a row that failed to halve the bracket."""
    zero, lo, hi, probe, aim = count(0), 0, None, 64, 0.6
    while hi is None:
        if count(probe) > length:
            hi = probe
        else:
            lo, rate = probe, max((count(probe) - zero) / probe, 0.1)
            probe = lo + max(1, math.ceil(aim * (length - count(lo)) / rate))
            aim = 1.02
    slow = 0
    while hi - lo > 1:
        width = hi - lo
        guess = lo + (length - count(lo)) * (hi - lo) // max(count(hi) - count(lo), 1)
        n = (lo + hi) // 2 if slow >= 2 else min(max(guess, lo + 1), hi - 1)
        lo, hi = (n, hi) if count(n) <= length else (lo, n)
        slow = 0 if slow >= 2 or hi - lo <= width // 2 else slow + 1
    return lo


def _fit_prompt(tokenizer, spec: _Spec, filler: Callable[[int], list[str]], length: int,
                task: str) -> tuple[int, _Rendered]:
    """(n, prompt) for the largest filler(n) whose prompt fits `length`; ValueError naming the minimum if none."""
    counts: dict[int, int] = {}
    best: dict[int, _Rendered] = {}  # the largest n that fits so far, which is what `_fit` returns

    def count(n: int) -> int:
        if n not in counts:
            rendered = _render(tokenizer, spec, filler(n))
            counts[n] = len(rendered.ids)
            if counts[n] <= length and n >= max(best, default=-1):
                best.clear()
                best[n] = rendered
        return counts[n]

    if count(0) > length:
        raise ValueError(f"length {length} is too short for task {task!r}: its template, question and "
                         f"needles alone take {count(0)} tokens; ask for at least {count(0)}")
    n = _fit(count, length)
    return n, best[n]


def _top_up(tokenizer, spec: _Spec, more: Callable[[int], list[str]], rendered: _Rendered,
            length: int) -> _Rendered:
    """`rendered` grown to exactly `length` tokens: the first tokens of the haystack's continuation
    (`more(m)`: the next m words) spliced in after the haystack, before the question."""
    missing = length - len(rendered.ids)
    if missing <= 0:
        return rendered
    m = missing
    while True:
        extra = tokenizer(spec.sep + spec.sep.join(more(m)), add_special_tokens=False)["input_ids"]
        if len(extra) >= missing:
            break
        if m > 64 * missing:
            raise ValueError(f"cannot top the prompt up by {missing} tokens: {m} more haystack words "
                             f"tokenize to {len(extra)}")
        m *= 2
    at = rendered.haystack_end
    spans = tuple((a + missing, b + missing) if a >= at else (a, b) for a, b in rendered.spans)
    return _Rendered(rendered.ids[:at] + extra[:missing] + rendered.ids[at:], spans, at + missing)


def _options(task: str, given: dict[str, Any]) -> dict[str, Any]:
    defaults = _FAMILIES[task][1]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; known: {sorted(defaults) or 'none'}")
    return {**defaults, **given}


def make_sample(task: str, tokenizer, length: int, seed: int, *, haystack: str = "natural",
                depth: float | None = None, exact: bool = False, **options) -> Sample:
    """Deterministic for (task, tokenizer, length, seed, haystack, depth, exact, options). depth None = drawn from
    the seed in [0, 1]. length = the target number of prompt tokens; the result is within ~5% (or 64 tokens) of
    it, or with `exact` exactly `length` tokens: the few missing ones are the first tokens of the haystack's
    continuation (for ``common_words``, which has no haystack, of `haystack` prose), spliced in after the
    haystack, so their ids need not equal a tokenization of the text (prompts of one length then batch
    without padding)."""
    if task not in _FAMILIES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    hs.haystack_sentences(haystack)  # raises for an unknown haystack
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("make_sample needs a fast (Rust) tokenizer: needle spans come from its offset mapping")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    build, _ = _FAMILIES[task]
    opts = _options(task, options)
    rng = random.Random(f"{task}:{seed}")  # str seeds hash with sha512: stable across processes
    drawn, start = rng.random(), rng.randrange(10**9)
    depth = drawn if depth is None else depth
    spec = build(rng, depth, length, **opts)
    filler = spec.filler or (lambda n: hs.filler_words(haystack, start, n))
    n, rendered = _fit_prompt(tokenizer, spec, filler, length, task)
    fitted = len(rendered.ids)
    if exact:
        more = (lambda m: filler(n + m)[n:]) if spec.filler is None else \
            (lambda m: hs.filler_words(haystack, start, m))
        rendered = _top_up(tokenizer, spec, more, rendered, length)
    info = {"depth": depth, "depths": [p.depth for p in spec.placed], "haystack": haystack if spec.filler is None
            else None, "units": n, "tokens": len(rendered.ids), "topped_up": len(rendered.ids) - fitted, "question": spec.question, "options": opts,
            **spec.info}
    return Sample(task=task, input_ids=torch.tensor([rendered.ids], dtype=torch.int64), answers=spec.answers,
                  needle_spans=rendered.spans, metric=spec.metric, seed=seed, length=length, info=info)


def _derive(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "little")


def make_samples(task: str, tokenizer, length: int, count: int, seed: int = 0, **kw) -> list[Sample]:
    """`count` samples with seeds derived from `seed`, depths spread evenly over [0, 1] (like RULER).

    A `depth` in `kw` fixes the depth of every sample instead; a single sample sits at depth 0.5."""
    fixed = kw.pop("depth", None)
    depths = [fixed] * count if fixed is not None else [i / (count - 1) if count > 1 else 0.5 for i in range(count)]
    return [make_sample(task, tokenizer, length, _derive(seed, i), depth=d, **kw) for i, d in enumerate(depths)]
