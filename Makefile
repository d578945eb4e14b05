# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml emulator/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[offline,transcribe,sentiment,lambda,dev]' -e ./emulator
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/callstream demo

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy callstream services emulator/callstream_emulator
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml compose.localstack.yml
	$(BIN)/lint-imports
	$(BIN)/vulture
	$(BIN)/deptry .
	$(BIN)/deptry --config emulator/pyproject.toml emulator

bench: setup
	$(BIN)/python bench/mkv_decode.py
	$(BIN)/python bench/asr_offline.py

clean:
	rm -rf $(VENV) .callstream .pytest_cache .mypy_cache .ruff_cache
