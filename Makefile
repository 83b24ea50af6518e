# Every target uses the project's own virtualenv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_OUT := clients/python

.PHONY: run test proto proto-check lint bench demo clean

$(BIN)/authsvc: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./clients/python -e '.[dev]'
	touch $@

# Start the service on its embedded default (SQLite) in dev mode.
run: $(BIN)/authsvc
	$(BIN)/authsvc serve --dev

# The whole test suite (PostgreSQL tests skip without a database, fail in CI).
test: $(BIN)/authsvc
	$(BIN)/pytest

# The only way the generated stubs change.
proto: $(BIN)/authsvc
	cd $(PROTO_OUT) && ../../$(BIN)/python -m grpc_tools.protoc \
		-Iauthsvc_client/v1=../../protos/authsvc/v1 \
		--python_out=. --pyi_out=. --grpc_python_out=. \
		../../protos/authsvc/v1/auth.proto

lint: $(BIN)/authsvc
	$(BIN)/ruff check authsvc clients/python/authsvc_client tests examples
	$(BIN)/mypy authsvc clients/python/authsvc_client

bench: $(BIN)/authsvc
	$(BIN)/python -m bench

# Start authsvc (dev mode) and two example services; show auth, denial, revocation, rotation.
demo: $(BIN)/authsvc
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .authsvc-dev
