# DREAM Studio. `make run` installs into .venv and launches the app on the bundled model;
# `make test` installs with the test extras and runs the whole suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 7860
MODEL_RUN ?= runs/shapes
EMOJI_RUN ?= runs/emoji

.PHONY: run test install install-test browser model model-emoji bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,train]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; browser tests will be skipped"

run: $(STAMP)
	$(BIN)/python launch.py --host $(HOST) --port $(PORT)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Train the bundled model from scratch on 2 CPU cores (VAE, T5 vocabulary, DREAM), export it to
# assets/dream-shapes and measure it (see assets/dream-shapes/README.md).
model: $(STAMP)
	$(BIN)/python -m training.make_shapes_model --work $(MODEL_RUN) --out assets/dream-shapes

# Fetch the three emoji sets with npm, then train the emoji model (VAE, T5 vocabulary, DREAM, heads,
# then continued DREAM and heads in two stages) on 2 CPU cores and export it to assets/dream-emoji.
# Resumable: run it again after an interruption.
model-emoji: $(STAMP)
	$(BIN)/python -m training.make_emoji_model --work $(EMOJI_RUN) --out assets/dream-emoji

bench: $(STAMP)
	$(BIN)/python -m bench.decode
	$(BIN)/python -m bench.shapes_eval

clean:
	rm -rf $(VENV) .pytest_cache
