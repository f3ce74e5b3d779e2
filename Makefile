# tunnelwatch: `make test` and `make demo` do all set-up themselves on a fresh Debian 12 (as root):
# the Debian packages of the real servers the tests and the demo run, a virtualenv, the project.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTHON ?= python3

# real servers and tools the lab starts (see docs/lab.md); installed only when missing
APT_PACKAGES := iproute2 nftables iputils-ping socat procps openssl python3-venv \
	wireguard-tools wireguard-go openvpn \
	strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins \
	ike-scan haproxy prometheus prometheus-alertmanager prometheus-blackbox-exporter etcd-server \
	gobgpd bird2 scamper unbound nftlb

PYTEST_ARGS ?=

.PHONY: all setup system-packages venv test lint typecheck pytest demo bench bench-perf docs \
	clean

all: test

setup: system-packages venv

system-packages:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "system packages: all present"; \
	elif [ "$$(id -u)" != 0 ]; then echo "system packages missing ($$missing); run as root to install them" >&2; \
	else echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
	    install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check probes tests

typecheck: venv
	$(VENV)/bin/mypy probes

pytest: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the whole default suite: lint, types, every test not marked slow
test: setup
	$(MAKE) --no-print-directory lint typecheck pytest

# opt-in: benchmarks and soaks (marked slow), figures printed side by side with their peers,
# and at the end one table of every figure the run recorded (tests/bench/conftest.py)
bench: setup
	$(VENV)/bin/pytest -m slow -s tests/bench $(PYTEST_ARGS)

# the performance comparisons only (docs/performance.md), in a few minutes: the agent against
# blackbox_exporter (bare loop, /probe over HTTP, the full scheduled agent), start error, RSS,
# the mesh's ingest, decision p99 and /metrics stall, WireGuard against the X25519 floor, IKEv2
# against WireGuard
BENCH_PERF := tests/bench/test_agent_bench.py::test_probes_per_cpu_second_vs_blackbox \
	tests/bench/test_agent_bench.py::test_schedule_precision_at_2000_per_second \
	tests/bench/test_agent_bench.py::test_rss_with_10000_targets \
	tests/bench/test_probe_http_bench.py \
	$(wildcard tests/bench/test_full_agent_bench.py) \
	tests/bench/test_mesh_bench.py::test_mesh_ingest_throughput_and_latency \
	tests/bench/test_mesh_scrape_bench.py \
	tests/bench/test_wireguard_bench.py::test_client_cpu_per_handshake \
	tests/bench/test_ikev2_bench.py::test_initiator_cpu_per_auth

bench-perf: setup
	$(VENV)/bin/pytest -m slow -s $(BENCH_PERF) $(PYTEST_ARGS)

# DEMO_ARGS: --quick (real clients only), --ha (mesh replicas on etcd), --duration S
DEMO_ARGS ?=

demo: setup
	$(VENV)/bin/tunnelwatch demo $(DEMO_ARGS)

# docs generated from code: docs/configuration-reference.md from the config models
docs: venv
	$(VENV)/bin/tunnelwatch config-reference

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
