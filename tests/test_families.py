"""The family matrix (issue 23): every rotary causal-LM family of the installed transformers, built tiny.

Generated from transformers' registries (`slimpass.eval.families.rotary_families`), not hand-listed. Each
family is either recognised and pruned exactly (dense compiled == eager, the reference with pruning off ==
the model bit for bit, pruned prefill == the family-generic reference in kept positions and logits, greedy
decode with reselection == the reference's), or declined on purpose with the reason
`families.DECLINED` names, which the user sees as a `SlimpassWarning`; or its tiny model does not build
here (`families.UNCHECKED`, with why).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from slimpass.eval import families

FAMILIES = [family for family, _cls in families.rotary_families()]


def test_the_matrix_is_generated_and_every_list_names_real_families():
    assert len(FAMILIES) >= 60  # transformers 5.17+ has well over that many rotary causal LMs
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
        assert name in FAMILIES
    listed = set(families.DECLINED) | set(families.UNCHECKED)
    assert not set(families.DECLINED) & set(families.UNCHECKED)
    # entries for families another transformers version lacks are allowed; every entry names its reason
    assert all(len(reason) > 15 for reason in {**families.DECLINED, **families.UNCHECKED}.values())
    assert listed


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    if families.UNCHECKED.get(family, "").startswith("not run:"):
        pytest.skip(families.UNCHECKED[family])
    result = families.check(family)
    if os.environ.get("SLIMPASS_FAMILIES_OUT"):  # the results, for `python -m slimpass.eval.families --results`
        with open(os.environ["SLIMPASS_FAMILIES_OUT"], "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(result)) + "\n")
    if family in families.UNCHECKED:
        assert not result.exact, f"{family} is pruned exactly now: remove it from families.UNCHECKED"
        assert families.UNCHECKED[family] in result.reason, result.reason
        return
    assert result.built, result.reason
    if family in families.DECLINED:
        assert not result.pruned, f"{family} is pruned now: check it and remove it from families.DECLINED"
        pruning = [w for w in result.warned if "prune=True does not apply" in w]
        assert pruning, f"{family}: pruning did not apply and no SlimpassWarning said so ({result.warned})"
        assert family in pruning[0] and families.DECLINED[family] in pruning[0], pruning
        assert result.dense_error is not None and result.dense_error <= 1e-4, result.dense_error
        return
    assert result.recognised, f"{family}: {result.layers} decoder layers found; {result.reason}"
    assert result.pruned, result.reason
    assert all("prune=True does not apply" not in w for w in result.warned), result.warned
    # a sliding-window config: reselection is declined with a warning, decode checked against the reference without it
    assert not result.reselect_declined or "sliding-window" in result.reselect_declined, result.reselect_declined
    assert result.dense_error <= 1e-4, result.dense_error
    assert result.reference_exact, "the reference with pruning off is not the model's forward bit for bit"
    assert result.keep_equal, "kept positions differ from the reference's"
    assert result.logits_error <= 1e-4, result.logits_error
    assert result.decode_equal, "greedy decode with reselection differs from the reference's"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3"])
def test_family_under_inductor(family):
    """A non-Llama family (q/k norms) end to end through Inductor's C++ code; Llama and Mistral have their own
    Inductor tests, and every family runs through our passes in `test_family` (the eager inner compiler)."""
    result = families.check(family, compiler="inductor", dense=False)
    assert result.recognised and result.pruned and not result.warned, result
    assert result.keep_equal and result.logits_error <= 1e-4 and result.decode_equal, result
