# Every target uses the project's own virtualenv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_OUT := clients/python
# buf (proto lint + breaking check) from npm, kept inside the virtualenv folder; skipped without npm.
BUF_VERSION := 1.75.0
BUF := $(VENV)/buf/node_modules/.bin/buf
# What `buf breaking` compares protos/ against: the last commit (CI: the commit before it).
BUF_AGAINST ?= HEAD
# kubernetes-validate and checkov for `make deploy-check`, in their own virtualenv (checkov's
# dependencies must not steer the project's).
DEPLOY_TOOLS := $(VENV)/deploy

.PHONY: run test proto proto-check lint proto-lint bench demo clean deploy-check

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

lint: $(BIN)/authsvc proto-lint
	$(BIN)/ruff check authsvc clients/python/authsvc_client tests examples bench
	MYPYPATH=clients/python $(BIN)/mypy authsvc clients/python/authsvc_client bench

$(BUF):
	@if command -v npm >/dev/null; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION); \
	else echo "npm not found: buf lint will be skipped"; fi

proto-lint: $(BUF)
	BUF=$(BUF) scripts/proto-lint.sh $(BUF_AGAINST)

$(DEPLOY_TOOLS)/bin/checkov:
	$(PYTHON) -m venv $(DEPLOY_TOOLS)
	$(DEPLOY_TOOLS)/bin/pip install --quiet --upgrade pip
	$(DEPLOY_TOOLS)/bin/pip install --quiet kubernetes-validate==1.37.0 checkov==3.3.30
	touch $@

# Kubernetes manifests (schemas, checkov), the Dockerfile (checkov) and the alert rules (promtool).
deploy-check: $(DEPLOY_TOOLS)/bin/checkov
	DEPLOY_TOOLS=$(DEPLOY_TOOLS)/bin scripts/check-deploy.sh

# Every section (BENCHMARKS.md), the last one side by side with node-oidc-provider from
# shared/peers/oidc-provider (npm ci into a temporary copy; skipped, saying why, without node).
bench: $(BIN)/authsvc
	$(BIN)/python -m bench

# Start authsvc (dev mode), a second replica over mTLS and the example services; show auth,
# denial, revocation, rotation, a secretless login, delegation and a stolen bound token refused.
demo: $(BIN)/authsvc
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .authsvc-dev
