# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,transcribe,sentiment,lambda,dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/callstream demo

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy callstream services
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml compose.localstack.yml
	$(BIN)/lint-imports
	$(BIN)/vulture
	$(BIN)/deptry .

bench: setup
	$(BIN)/python bench/mkv_decode.py
	$(BIN)/python bench/asr_offline.py

clean:
	rm -rf $(VENV) .callstream .pytest_cache .mypy_cache .ruff_cache
