"""Full vs pruned, side by side: task accuracy, needle survival per pruning stage, fidelity and TTFT.

    settings = EvalSettings(tasks=("passkey",), lengths=(1024, 2048), schedules={"default": "default"})
    results = run(settings)            # a JSON-able dict; slimpass.eval.report turns it into tables/plots

The full model is the model's own eager forward (no compile). Each schedule compiles the same model
with `slimpass.compile(prune=True, ...)` (the product path; `compiler="eager"` by default, which runs
our passes without Inductor's C++ build), runs every sample, then restores the model. Samples come from
`slimpass.eval.tasks` (deterministic per seed); answers are greedy. TTFT is the time from the call
to the first generated token (a logits processor notes the time of its first call) on this machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from collections.abc import Iterator
from typing import Any

import torch
import transformers

import slimpass
from slimpass.eval import fidelity, models, prose, tasks
from slimpass.hf_compat import context_length


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate. `schedules`: name -> a `SlimConfig.schedule` value (preset name or mapping), or a
    dict of SlimConfig options holding "schedule" (e.g. ``{"schedule": {9: 0.5}, "scorer": "tokenunit"}``)."""

    model: str = models.DEFAULT_MODEL
    tasks: tuple[str, ...] = ("passkey",)
    lengths: tuple[int, ...] = (1024,)
    schedules: dict[str, Any] = dataclasses.field(default_factory=lambda: {"default": "default"})
    samples: int = 20
    """Samples per seed: a cell holds samples * len(seeds) of them."""
    seeds: tuple[int, ...] = (0,)
    haystack: str = "natural"
    max_new_tokens: int = 24
    fidelity_samples: int = 0
    fidelity_tokens: int = 32
    fidelity_text: str = "natural"
    """Where fidelity prompts come from: "natural" (pydoc topics, ~23k tokens, repeated past that) or a
    name of `slimpass.eval.prose.TEXTS` ("eb1911": ~80k tokens of 1911 encyclopaedia prose)."""
    options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"min_prompt_len": 256})
    """Extra SlimConfig options for every pruned variant (scorer, block_size, ...)."""
    compiler: str = "auto"
    device: str = "cpu"
    """Where the model runs ("cpu", "cuda", ...)."""
    dtype: str = "float32"
    """The model's dtype (float32, bfloat16, float16); float32 answers match across devices up to rounding."""

    def __post_init__(self) -> None:
        if self.dtype not in models.DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: give one of {', '.join(models.DTYPES)}")
        if self.fidelity_text != "natural" and self.fidelity_text not in prose.TEXTS:
            raise ValueError(f"fidelity_text {self.fidelity_text!r}: give natural or one of {', '.join(prose.TEXTS)}")
        unknown = [t for t in self.tasks if t not in tasks.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(tasks.TASKS)}")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths {self.lengths}: give prompt lengths of at least 64 tokens")
        if self.samples < 1 or not self.schedules or not self.seeds:
            raise ValueError("give samples >= 1, at least one seed and at least one schedule")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed: its samples would count twice")
        if "prune" in self.options:  # every variant but "full" is the pruned model: prune is not an option here
            if self.options["prune"] is not True:
                raise ValueError(f"option prune={self.options['prune']!r}: eval compares the full model with pruned "
                                 "variants (their schedules), so it always prunes; drop the prune option")
            object.__setattr__(self, "options", {k: v for k, v in self.options.items() if k != "prune"})  # frozen
        slimpass.SlimConfig(prune=True, **self.options)  # bad options fail here, before any model work
        for name, schedule in self.schedules.items():
            slimpass.SlimConfig(prune=True, **{**self.options, **variant_options(schedule)})
            if name == "full":
                raise ValueError("'full' names the unpruned model; give the schedule another name")


def variant_options(value: Any) -> dict[str, Any]:
    """SlimConfig options of one pruned variant: a schedule value, or a dict of options with "schedule"."""
    if isinstance(value, dict) and "schedule" in value:
        return {str(k): v for k, v in value.items()}
    return {"schedule": value}


class FirstTokenTimer(transformers.LogitsProcessor):
    """Notes when generate asks for the first token's logits processing: prefill done."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)  # the logits exist, not just their kernels' launches
            self.first = time.perf_counter()
        return scores


def progress_bar(total: int, enabled: bool, unit: str = "run"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: no bar without tqdm
        return None
    return tqdm(total=total, disable=not enabled, unit=unit, dynamic_ncols=True)


def survival(sample: tasks.Sample, keep_sets: list[Any] | None) -> list[bool] | None:
    """Per pruning stage: did every token of every needle reach that layer? None if nothing to check."""
    if not sample.needle_spans or keep_sets is None:
        return None
    needed = sample.needle_positions
    return [needed <= set(k.positions[0].tolist()) for k in keep_sets]


def answer(model: torch.nn.Module, tokenizer: Any, sample: tasks.Sample, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answer of one sample, its score, TTFT and (pruned models) the kept counts and needle survival."""
    device = next(model.parameters()).device
    ids = sample.input_ids.to(device)
    timer = FirstTokenTimer()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             logits_processor=transformers.LogitsProcessorList([timer]))
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    keep = slimpass.last_keep_sets(model) if "_slimpass_original_forward" in model.__dict__ else None
    return {
        "seed": sample.seed, "tokens": int(ids.shape[1]), "answer": text, "answers": list(sample.answers),
        "score": tasks.score(sample, text), "ttft_ms": (timer.first - timer.start) * 1e3,
        "kept": None if keep is None else [[k.layer, k.tokens] for k in keep],
        "survived": survival(sample, keep),
    }


def _variants(model: torch.nn.Module, settings: EvalSettings) -> Iterator[tuple[str, torch.nn.Module]]:
    """("full", the plain model), then each schedule's compiled model (restored afterwards)."""
    yield "full", model
    for name, schedule in settings.schedules.items():
        torch._dynamo.reset()
        options = {"prune": True, "compiler": settings.compiler, **settings.options, **variant_options(schedule)}
        slimpass.compile(model, options=options)
        try:
            yield name, model
        finally:
            slimpass.restore(model)
            torch._dynamo.reset()


def run(settings: EvalSettings, progress: bool = True, loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Evaluate; returns {"settings", "environment", "tasks": [rows], "fidelity": [rows]} (see report)."""
    model, tokenizer = loaded or models.load(settings.model, dtype=models.DTYPES[settings.dtype])
    model.to(settings.device)
    context = context_length(model.config)
    if context is not None and max(settings.lengths) + settings.max_new_tokens > context:
        raise ValueError(f"length {max(settings.lengths)} + {settings.max_new_tokens} new tokens is past the model's "
                         f"context ({context} tokens, config.max_position_embeddings): give lengths up to "
                         f"{context - settings.max_new_tokens}")
    samples = {(t, n): [s for seed in settings.seeds
                        for s in tasks.make_samples(t, tokenizer, n, settings.samples, seed=seed,
                                                    haystack=settings.haystack)]
               for t in settings.tasks for n in settings.lengths}
    natural = tokenizer(fidelity_text(settings.fidelity_text), add_special_tokens=False).input_ids \
        if settings.fidelity_samples else []
    variants = 1 + len(settings.schedules)
    prompts = [(seed, i) for seed in settings.seeds for i in range(settings.fidelity_samples)]
    total = variants * (sum(map(len, samples.values())) + len(settings.lengths) * len(prompts))
    bar = progress_bar(total, progress)
    task_rows, fidelity_rows, full_views = [], [], {}
    for variant, runner in _variants(model, settings):
        for (task, length), group in samples.items():
            for sample in group:
                task_rows.append({"task": task, "length": length, "schedule": variant,
                                  **answer(runner, tokenizer, sample, settings.max_new_tokens)})
                bar and bar.update()
        for length in settings.lengths if settings.fidelity_samples else ():
            for seed, i in prompts:
                ids = fidelity.natural_prompt(natural, length, seed * 7919 + i).to(settings.device)
                view = fidelity.continuation(runner, ids, settings.fidelity_tokens, tokenizer.eos_token_id)
                if variant == "full":
                    full_views[length, seed, i] = view
                else:
                    fidelity_rows.append({"length": length, "schedule": variant, "seed": seed, "sample": i,
                                          **fidelity.compare(full_views[length, seed, i], view)})
                bar and bar.update()
    bar and bar.close()
    return {"settings": _jsonable(dataclasses.asdict(settings)), "environment": environment(model),
            "tasks": task_rows, "fidelity": fidelity_rows}


def fidelity_text(name: str) -> str:
    """The text fidelity prompts are cut from: "natural" or a name of `prose.TEXTS`."""
    return tasks.haystack_text("natural") if name == "natural" else prose.prose_text(name)


def environment(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "model_type": config.model_type, "layers": config.num_hidden_layers, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
