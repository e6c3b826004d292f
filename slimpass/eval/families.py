"""The family matrix: every causal-LM family of the installed transformers whose attention uses rotary
embeddings, built tiny and checked against the model itself and the family-generic reference.

For each family (found in transformers' own registries, not listed by hand) `check` builds a tiny
random-weight float32 model (a few layers, GQA where the family has it) and reports:

- recognised: the prefill graph's decoder layers were all found (`slimpass.compiled_graphs`);
- dense: `slimpass.compile` with pruning off against the model's eager forward (max |logits| error),
  and the reference with pruning off against the same forward (bit for bit);
- pruned: the pruned prefill against `slimpass.runtime.reference` (kept positions per stage equal, logits);
- decode: greedy `generate` steps with decode-time reselection against the reference's;
- static_decode (optional, slower): the same with ``static_decode=True``;
- warned: the `SlimpassWarning`s raised when pruning did not apply.

`DECLINED` is the explicit list of families slimpass declines on purpose, each with the reason the
warning gives (the test asserts that reason); `UNCHECKED` the families whose tiny model cannot be
built or run here (or whose check fails: a known failure), with why. Every other rotary family must be
recognised and pruned exactly.

Run ``python -m slimpass.eval.families --out results.json --table docs/FAMILIES.md`` to regenerate the
support table (`tests/test_families.py` runs the same checks in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import warnings
from collections.abc import Iterator

import torch

# The tiny geometry: 4 layers, pruned at layers 2 and 3, blocks of 8 tokens, a 150-token prompt.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
# Set only where the family's config has the field: small mixtures of experts, small latent attention.
TINY_IF_PRESENT = dict(
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, shared_expert_intermediate_size=32, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
)
OVERRIDES: dict[str, dict] = {  # per-family fixes that let the tiny config build
    "codegen": dict(rotary_dim=8, n_embd=64, n_layer=4, n_head=4),
    "gptj": dict(rotary_dim=8, n_embd=64, n_layer=4, n_head=4),
}
PRUNED = dict(compiler="eager", prune=True, schedule={2: 0.5, 3: 0.25}, block_size=8, unit_size=2, local_window=4,
              min_prompt_len=64, reselect=True, active_tokens=32)
PROMPT = 150
DECODE_STEPS = 8
# greedy, and no early stop: a random model may pick the eos id, after which generate pads (the reference does not)
GENERATE = dict(max_new_tokens=DECODE_STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)

# Families declined on purpose: family -> the reason the warning names (a substring of it); and families whose
# tiny model does not build or whose check fails here: family -> why. Generated from a run of `main` (transformers
# 5.24); the matrix test reads both.
DECLINED: dict[str, str] = {
    'beam': 'layer 0: could not identify the residual stream entering and leaving the layer',
    'codegen': 'no decoder layer is rotary-embedded (x*cos + rotate_half(x)*sin): not a RoPE',
    'deepseek_v2': 'from outside the layer but is not rotary-embedded in an accepted form (x*cos +',
    'deepseek_v4': 'layer 0: expected one attention call, found 0 SDPA and 4 softmax nodes',
    'diffllama': 'layer 0: expected one attention call, found 2 SDPA and 0 softmax nodes',
    'doge': 'layer 0: could not identify the residual stream entering and leaving the layer',
    'dory': 'layer 0: expected one attention call, found 2 SDPA and 0 softmax nodes',
    'falcon_h1': 'a function of the prompt length computed before the cut by more than integer',
    'flint': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'gemma2': 'layer 0: attention-logit soft-capping (tanh(scores / cap) * cap before the',
    'gemma4_text': 'layer 0: could not identify the residual stream entering and leaving the layer',
    'gemma4_unified_text': 'layer 0: could not identify the residual stream entering and leaving the layer',
    'gpt_neox_japanese': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'gpt_oss': 'layer 0: expected one attention call, found 0 SDPA and 2 softmax nodes',
    'gptj': 'no decoder layer is rotary-embedded (x*cos + rotate_half(x)*sin): not a RoPE',
    'granite_swa': 'from outside the layer but is not rotary-embedded in an accepted form (x*cos +',
    'granitemoe_swa': 'layer 0: expected one attention call, found 0 SDPA and 2 softmax nodes',
    'hrm_text': 'layer 0: expected one attention call, found 8 SDPA and 0 softmax nodes',
    'hy_v4': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'jetmoe': 'no decoder layers (no module path ending in a layer index, such as',
    'lara_mini': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'lfm3': 'layer 0: expected one attention call, found 0 SDPA and 0 softmax nodes',
    'llama4_text': 'from outside the layer but is not rotary-embedded in an accepted form (x*cos +',
    'mimo_v2_flash': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'minicpm3': 'layer 0: query and key use different cos/sin producers (or only one is',
    'minimax': 'layer 0: could not identify the residual stream entering and leaving the layer',
    'modernbert-decoder': 'layer 1 attention keeps a mask (padding, or not proven causal): pruning needs',
    'olmo_hybrid': 'layer 0: expected one attention call, found 0 SDPA and 0 softmax nodes',
    'qwen3_5_moe_text': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'qwen3_5_text': 'layer 0: expected one attention call, found 0 SDPA and 0 softmax nodes',
    'qwen3_next': 'layer 0: eager attention without the (q @ k^T) * scale pattern',
    'recurrent_gemma': 'layer 0: expected one attention call, found 0 SDPA and 0 softmax nodes',
    'sarvam_mla': 'no decoder layer is rotary-embedded (x*cos + rotate_half(x)*sin): not a RoPE',
    'vaultgemma': 'layer 0: attention-logit soft-capping (tanh(scores / cap) * cap before the',
}
UNCHECKED: dict[str, str] = {
    'blt': 'not run: its tiny check printed nothing within 240 s in a child process',
    'axk1': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'axk2': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'bailing_hybrid': 'can only be called on Attention layers, and the current Cache seem to only contain LinearAttention',
    'bamba': 'can only be called on Attention layers, and the current Cache seem to only contain LinearAttention',
    'cohere_compass_text': "tiny config does not build: KeyError: 'full_attention'",
    'dbrx': "tiny config does not build: AttributeError: 'DbrxAttentionConfig' object has no attribute",
    'deepseek_v3': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'deepseek_v32': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'dots3_note': 'not built: a multimodal model (audio_config, vision_config): its text decoder is checked as its own',
    'dots3_note_text': "tiny config does not build: AmbiguousGlobalPerLayerAttributeError: 'kv_lora_rank' is a per-layer",
    'emu3': "tiny config does not build: AttributeError: 'Emu3Config' object has no attribute 'attention_dropout'",
    'falcon': "tiny config does not build: AttributeError: property 'head_dim' of 'FalconConfig' object has no",
    'gemma3': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'gemma3n': 'not built: a multimodal model (audio_config, vision_config): its text decoder is checked as its own',
    'gemma3n_text': 'tiny config does not build: ValueError: The set of layer types producing a cache is different than',
    'gemma4': 'not built: a multimodal model (audio_config, vision_config): its text decoder is checked as its own',
    'gemma4_unified': 'not built: a multimodal model (audio_config, vision_config): its text decoder is checked as its own',
    'glm4_moe_lite': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'glm_moe_dsa': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'granitemoehybrid': 'can only be called on Attention layers, and the current Cache seem to only contain LinearAttention',
    'inkling2_text': "the tiny model's own generate fails: IndexError: index out of range in self",
    'lfm2_moe': "tiny config does not build: TypeError: 'NoneType' object is not subscriptable",
    'llama4': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'longcat_flash': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'mllama': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'moshi': 'not built: a multimodal model (audio_encoder_config): its text decoder is checked as its own family',
    'phi4_multimodal': 'not built: a multimodal model (audio_config, vision_config): its text decoder is checked as its own',
    'qwen3_5': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'qwen3_5_moe': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'qwen4_exp': 'not built: a multimodal model (vision_config): its text decoder is checked as its own family where',
    'qwen4_exp_text': "tiny config does not build: TypeError: unsupported operand type(s) for //: 'NoneType' and 'NoneType'",
    'youtu': "the tiny model's own forward fails: RuntimeError: The size of tensor a (4) must match the size of",
    'zamba2': 'tiny config does not build: StrictDataclassClassValidationError: Class validation error for',
    'zaya': 'tiny config does not build: StrictDataclassClassValidationError: Class validation error for',
}


class NotTiny(Exception):
    """This family is not built tiny here; the message says why."""


@dataclasses.dataclass
class FamilyResult:
    family: str
    model_class: str = ""
    built: bool = False
    recognised: bool = False
    layers: str = ""  # "found/total" in the prefill graph
    pruned: bool = False
    dense_error: float | None = None
    reference_exact: bool | None = None  # the reference with pruning off == the model's forward, bit for bit
    logits_error: float | None = None  # pruned prefill vs the reference
    keep_equal: bool | None = None
    decode_equal: bool | None = None
    static_equal: bool | None = None
    warned: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""
    reselect_declined: str = ""  # why decode-time reselection did not apply (then decode is checked without it)

    @property
    def exact(self) -> bool:
        return bool(self.pruned and self.reference_exact and self.keep_equal and self.decode_equal and self.logits_error is not None
                    and self.logits_error <= 1e-4 and self.dense_error is not None and self.dense_error <= 1e-4)


def _modeling_module(family: str, class_name: str):
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        return None, None
    return cls, inspect.getmodule(cls)


def rotary_families() -> Iterator[tuple[str, type]]:
    """(model type, causal-LM class) of every family in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` whose modeling
    module defines a rotary embedding (a ``*RotaryEmbedding`` class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for family, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        try:
            cls, module = _modeling_module(family, class_name)
        except Exception:  # noqa: BLE001 - a family whose module does not import here (missing extra)
            continue
        if module is not None and any(name.endswith("RotaryEmbedding") for name in vars(module)):
            yield family, cls


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight float32 model of `family` in eval mode, with sdpa attention where the family has it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    config_cls = CONFIG_MAPPING[family]
    towers = sorted(k for k in getattr(config_cls, "sub_configs", {}) if any(t in k for t in ("vision", "audio", "speech")))
    if towers:
        raise NotTiny(f"a multimodal model ({', '.join(towers)}): its text decoder is checked as its own family "
                      "where transformers registers one")
    default = config_cls()
    settings = {**TINY, **{k: v for k, v in TINY_IF_PRESENT.items() if hasattr(default, k)}, **OVERRIDES.get(family, {})}
    config = config_cls(**settings)
    config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    torch.manual_seed(seed)
    return cls(config).eval()


def _twin(model: torch.nn.Module) -> torch.nn.Module:
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def check(family: str, compiler: str = "eager", static: bool = False, dense: bool = True) -> FamilyResult:
    """Build `family` tiny and run the matrix's checks on it (see the module docstring); `dense=False` skips
    the dense compile (one graph less where compiling is slow)."""
    import slimpass
    from slimpass.runtime import reference

    result = FamilyResult(family)
    try:
        model = tiny_model(family)
    except NotTiny as error:
        result.reason = f"not built: {error}"
        return result
    except Exception as error:  # noqa: BLE001 - any failure to build is reported, not raised
        result.reason = f"tiny config does not build: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return result
    result.model_class = type(model).__name__
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(PROMPT))
    try:
        want = model(ids).logits[:, -1]
    except Exception as error:  # noqa: BLE001 - the tiny config builds a model that does not run
        result.reason = f"the tiny model's own forward fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return result
    result.built = True
    try:
        result.reference_exact = torch.equal(reference.prefill(model, ids).logits, want)
    except Exception as error:  # noqa: BLE001 - reported in the table
        result.reason = f"the reference cannot run it: {type(error).__name__}: {str(error)[:160]}"
    torch._dynamo.reset()
    options = {**PRUNED, "compiler": compiler}
    config = slimpass.config.resolve(options, None)
    pruned = _twin(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", slimpass.SlimpassWarning)
        try:
            slimpass.compile(pruned, options=options)
            out = pruned.generate(ids, **GENERATE, return_dict_in_generate=True, output_logits=True)
            tokens, logits = out.sequences, out.logits[0]  # the prefill's last-position logits
            keep = slimpass.last_keep_sets(pruned)
        except Exception as error:  # noqa: BLE001 - a failure of the compiled model is a result, reported
            try:
                model.generate(ids, **GENERATE)
            except Exception as own:  # noqa: BLE001 - the model's own generate fails too: not slimpass's
                result.built = False
                result.reason = f"the tiny model's own generate fails: {type(own).__name__}: {str(own).splitlines()[0][:160]}"
                return result
            result.reason = f"the compiled model fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            return result
    result.warned = [str(w.message) for w in caught if issubclass(w.category, slimpass.SlimpassWarning)]
    prefill = [r for r in slimpass.compiled_graphs(pruned) if r.kind == "prefill"]
    depth = model.config.get_text_config().num_hidden_layers
    found = max((r.layers for r in prefill), default=0)
    result.layers = f"{found}/{depth}"
    result.recognised = found == depth
    result.pruned = bool(keep)
    if not result.pruned:  # it ran dense: that run is the dense check
        result.dense_error = _error(logits, want)
        pruning = [w for w in result.warned if "prune=True does not apply" in w]
        result.reason = (pruning or result.warned or ["pruning did not apply and nothing warned"])[0]
        return result
    declined = [w for w in result.warned if "reselect=True does not apply" in w or "reselect=True/" in w]
    if declined:  # the compiled decode attends to every cached token: so does the reference it is checked against
        result.reselect_declined = declined[0]
        config = config.replace(reselect=False)
    try:
        state = reference.prefill(model, ids, config)
        expected = reference.generate(model, ids, config, max_new_tokens=DECODE_STEPS)
    except Exception as error:  # noqa: BLE001 - reported in the table
        result.reason = f"the reference cannot run it: {type(error).__name__}: {str(error)[:160]}"
        return result
    result.logits_error = _error(logits, state.logits)
    result.keep_equal = [k.layer for k in keep] == [k.layer for k in state.keep_sets] and all(
        torch.equal(a.positions.cpu(), b.positions.cpu()) for a, b in zip(keep, state.keep_sets))
    result.decode_equal = torch.equal(tokens, expected)
    if dense:
        torch._dynamo.reset()
        compiled = slimpass.compile(_twin(model), options={"compiler": compiler})
        result.dense_error = _error(compiled(ids, use_cache=False).logits[:, -1], want)
    if static:
        torch._dynamo.reset()
        fixed = slimpass.compile(_twin(model), options={**options, "static_decode": True})
        result.static_equal = torch.equal(
            fixed.generate(ids, **GENERATE), expected)
    return result


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[value]


def _static(r: FamilyResult) -> str:
    return "declined¹ (output exact)" if r.static_equal and r.reselect_declined else _mark(r.static_equal)


def _decode(r: FamilyResult) -> str:
    return "yes, without reselection¹" if r.decode_equal and r.reselect_declined else _mark(r.decode_equal)


def table(results: list[FamilyResult]) -> str:
    """The README's support table: family | recognised | pruning | decode/reselection | static_decode | reason."""
    lines = ["| family | class | recognised | pruning (exact vs reference) | decode + reselection | static_decode | "
             "reason when declined |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (not r.exact, not r.built, r.family)):
        reason = (r.reason or "").replace("|", "\\|").replace("\n", " ")
        if len(reason) > 160:
            reason = reason[:157] + "..."
        pruning = "yes" if r.exact else ("**no**" if r.built else "–")
        lines.append(f"| {r.family} | {r.model_class or '–'} | {_mark(r.recognised) if r.built else '–'} "
                     f"({r.layers or '–'}) | {pruning} | {_decode(r)} | {_static(r)} | {reason} |")
    if any(r.reselect_declined for r in results if r.exact):
        lines += ["", "¹ " + _RESELECT_NOTE]
    return "\n".join(lines)


_RESELECT_NOTE = ("the family's config sets a sliding window, so decode masks stay in the graph and reselection is "
                  "declined with a `SlimpassWarning` (decode attends every kept token; exact against the reference "
                  "without reselection); static_decode, which needs a SlimCache too, is declined the same way.")


def _category(reason: str) -> str:
    """A decline reason without its graph-specific details (node names, layer numbers, sizes), to group by."""
    import re

    text = reason.split(". This graph runs without it")[0].replace(" (not a RoPE decoder slimpass recognises)", "")
    text = re.sub(r"^slimpass: [^:]+: prune=True does not apply \(([^)]*)\): ", r"\1: ", text)
    text = re.sub(r"`[^`]*`", "`…`", text)
    text = re.sub(r"\blayers? \[?\d+(, \d+)*\]?", "layer N", text)
    text = re.sub(r"\b(\d+\*s\d+|s\d+|\d+)\b", "n", text)
    return text[:200]


def readme_section(results: list[FamilyResult]) -> str:
    """The README's part of the table: the families pruned exactly, and the others grouped by reason."""
    exact = sorted((r for r in results if r.exact), key=lambda r: r.family)
    rows: dict[tuple[str, str], list[str]] = {}
    for r in exact:  # one row per combination of results: the table stays short
        rows.setdefault((_decode(r), _static(r)), []).append(r.family)
    lines = ["| families | recognised | pruning (exact vs reference) | decode + reselection | static_decode |",
             "|---|---|---|---|---|"]
    lines += [f"| {', '.join(names)} | yes | yes | {decode} | {static} |" for (decode, static), names in rows.items()]
    if any(r.reselect_declined for r in exact):
        lines += ["", "¹ " + _RESELECT_NOTE]
    groups: dict[str, list[str]] = {}
    for r in results:
        if not r.exact:
            groups.setdefault(_category(r.reason or "not pruned"), []).append(r.family)
    lines += ["", "| not pruned: reason (grouped) | families |", "|---|---|"]
    for reason, names in sorted(groups.items(), key=lambda item: -len(item[1])):
        lines.append(f"| {reason.replace('|', '/')} | {', '.join(sorted(names))} |")
    return "\n".join(lines)


README_START, README_END = "<!-- families:start -->", "<!-- families:end -->"


def _replace_section(path: str, text: str) -> None:
    with open(path) as handle:
        content = handle.read()
    if README_START not in content or README_END not in content:
        raise SystemExit(f"{path}: no {README_START} ... {README_END} section to replace")
    head, rest = content.split(README_START, 1)
    _old, tail = rest.split(README_END, 1)
    with open(path, "w") as handle:
        handle.write(f"{head}{README_START}\n{text}\n{README_END}{tail}")


def _run_isolated(family: str, static: bool) -> FamilyResult:
    """`check` in a child process: a family that crashes or hangs the interpreter takes only itself down."""
    import subprocess

    code = (f"import json, dataclasses; from slimpass.eval.families import check; "
            f"print('RESULT', json.dumps(dataclasses.asdict(check({family!r}, static={static!r}))))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return FamilyResult(family, reason="check timed out (240 s)")
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return FamilyResult(**json.loads(line[7:]))
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return FamilyResult(family, reason=f"check crashed: {tail[:160]}")


def load(path: str) -> list[FamilyResult]:
    """Results written by ``--out`` (a JSON list), or by the matrix test (``SLIMPASS_FAMILIES_OUT``, JSON lines)."""
    with open(path) as handle:
        text = handle.read()
    entries = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    return [FamilyResult(**entry) for entry in entries]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--table", help="write the markdown support table here")
    parser.add_argument("--readme", help="replace the README's families section (between its markers) too")
    parser.add_argument("--static", action="store_true", help="also check static_decode (slower)")
    parser.add_argument("--results", help="make the tables from this --out file instead of checking again")
    parser.add_argument("--jobs", type=int, default=2, help="families checked at once (one process each)")
    parser.add_argument("families", nargs="*", help="only these model types (default: every rotary family)")
    args = parser.parse_args(argv)
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    names = args.families or [family for family, _cls in rotary_families()]
    if args.results:
        results = load(args.results)
        seen = {r.family for r in results}
        results += [FamilyResult(f, reason=UNCHECKED[f]) for f in names if f not in seen and f in UNCHECKED]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(tqdm(pool.map(lambda f: _run_isolated(f, args.static), names), total=len(names),
                                unit="family"))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump([dataclasses.asdict(r) for r in results], handle, indent=1)
    text = table(results)
    if args.table:
        import transformers

        exact = sum(r.exact for r in results)
        with open(args.table, "w") as handle:
            source = f"`--results {args.results}`, the matrix test's results" if args.results else "a fresh run"
            handle.write(f"# Model families\n\nGenerated by `python -m slimpass.eval.families --table docs/FAMILIES.md` "
                         f"({source}; static_decode is checked only with `--static`) with transformers "
                         f"{transformers.__version__} and torch {torch.__version__} (CPU, "
                         f"float32, tiny random configs): {exact} of {len(results)} rotary causal-LM families "
                         "recognised and pruned exactly against the family-generic reference; the others declined "
                         "with the reason below (and a `SlimpassWarning` when `prune=True`).\n\n" + text + "\n")
    if args.readme:
        _replace_section(args.readme, readme_section(results))
    print(text)


if __name__ == "__main__":
    main()
