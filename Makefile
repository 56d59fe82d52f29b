# micro-ovms: host entry points. `make sim` and `make test` install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= /dev/ttyUSB0

.PHONY: deps sim test bench clean

$(STAMP): tools/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tools/requirements.txt
	touch $@

deps: $(STAMP)
	@sh tools/need_mosquitto.sh

sim: deps
	$(PY) tools/sim.py

test: deps
	$(VENV)/bin/pytest -q tests_host

bench: deps
	$(PY) tools/bench.py all

clean:
	rm -rf build .sim .pytest_cache .hypothesis
