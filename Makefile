# Two set-up commands: `make run` (serve the embedded default) and `make test` (the test suite).
# Both create .venv and install the project; torch comes from pip's local wheels (no weights are downloaded).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install run test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,onnx,ray]'
	touch $@

install: $(VENV)/.installed

# `make run` serves ./prompts, the directory the README's `training.publish --to prompts/` publishes into (the
# service watches it, so a publication is served within seconds); the first run seeds it with the demo sets.
PROMPTS ?= prompts
DEMO_SETS := mmap_model/weights/mmap-tiny/promptsets

$(PROMPTS):
	cp -r $(DEMO_SETS) $@

run: install | $(PROMPTS)
	$(BIN)/python -m service --prompts $(PROMPTS)

# Two processes (pytest-xdist; each test file stays in one): the suite is mostly waiting on real services.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .
