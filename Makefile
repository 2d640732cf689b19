# twincd: `make demo` runs the main job on the local stack; `make test` runs every test.
.PHONY: setup up down status demo test lint
TWINCD := .venv/bin/twincd

setup:
	@scripts/setup.sh

up: setup
	$(TWINCD) up

down:
	@if [ -x $(TWINCD) ]; then $(TWINCD) down; fi

status: setup
	$(TWINCD) status

demo: setup
	$(TWINCD) demo

# Every test: unit, integration and end-to-end. Tests start their own services on free ports.
test: setup
	.venv/bin/python -m pytest tests

# Style, formatting, types (mypy --strict) and the dependency direction (import-linter); all must pass.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports
