# micro-ovms: host entry points. `make sim` and `make test` install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= /dev/ttyUSB0
ARCH    ?= xtensawin
# test workers: most of a test run waits on devices, brokers and timers, so more than the cores
JOBS    ?= 4

.PHONY: deps sim test bench vehicles firmware flash deploy package clean

$(STAMP): tools/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tools/requirements.txt
	touch $@

deps: $(STAMP)
	@sh tools/need_packages.sh

# The virtual device against a local TLS broker, replaying a real drive (Ctrl-C stops).
sim: deps
	$(PY) tools/sim.py

# Every test: host tools on CPython, device code on the micropython binary, a real mosquitto.
test: deps
	$(VENV)/bin/pytest -q -n $(JOBS) tests_host

# Benchmarks (decoder speed, MQTT data usage and loop health, memory): ratios from one run.
bench: deps
	$(PY) tools/bench.py all

# Device modules compiled from firmware/vehicles/*/vehicle.json (DBC + mapping).
vehicles: deps
	$(PY) tools/vehicles.py build-all -o build/vehicles --mpy

# ESP32 image with the app frozen in (official ESP-IDF container; needs docker, not run in CI).
firmware: deps
	firmware/build.sh

# Erase and flash the image: make flash PORT=/dev/ttyUSB0
flash: deps
	$(PY) tools/ovms.py flash -p $(PORT)

# Copy the app (compiled with mpy-cross -march=$(ARCH)) to a module: make deploy PORT=...
deploy: deps
	$(PY) tools/ovms.py deploy -p $(PORT) --arch $(ARCH)

# package.json for `mpremote mip install github:OWNER/REPO`.
package: deps
	$(PY) tools/ovms.py package

clean:
	rm -rf build .sim .pytest_cache .hypothesis
