# Two commands from a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,whatsapp]'
	touch $@

## run: install if needed, then start the daemon on the defaults in config/
run: $(VENV)/.installed
	$(BIN)/evolution-router run

## check: validate config/ and print the routes
check: $(VENV)/.installed
	$(BIN)/evolution-router check

## lint: ruff and mypy (strict)
lint: $(VENV)/.installed
	$(BIN)/ruff check router tests bench
	$(BIN)/ruff format --check router tests bench
	$(BIN)/mypy

# The real Node.js clients (ws, socket.io-client) the WebSocket tests drive.
NODE_CLIENTS := tests/node/node_modules/.installed
$(NODE_CLIENTS): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

## test: lint, then the whole suite against real servers on loopback
test: lint $(NODE_CLIENTS)
	$(BIN)/pytest -q

## bench: throughput and latency against a bare client, in one run (not a test)
bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var bench/results tests/node/node_modules
