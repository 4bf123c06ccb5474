PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-cluster install run-local bench schemas lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'

## Run the whole test suite against local RabbitMQ, Redis and a SecantusDB it starts.
test: install
	./.ci/services
	$(BIN)/python -m pytest

## Only the cluster tests: a three-node RabbitMQ cluster of their own (tests/support/cluster.py), nodes lost and killed processes.
test-cluster: install
	./.ci/services
	$(BIN)/python -m pytest tests/cluster

## Run the whole system without Docker: local RabbitMQ/Redis, a SecantusDB it starts.
run-local: install
	./.ci/services
	$(BIN)/python -m sandboxes.local

bench: install
	$(BIN)/python bench/receiver_throughput.py
	$(BIN)/python bench/merge_throughput.py
	$(BIN)/python bench/sync_latency.py
	$(BIN)/python bench/feed_latency.py
	$(BIN)/python bench/queue_cost.py --cluster

lint: install
	$(BIN)/ruff check .

schemas: install
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) .pytest_cache .local
