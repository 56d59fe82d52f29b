# micro-ovms: host entry points. `make sim` and `make test` install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= /dev/ttyUSB0
ARCH    ?= xtensawin
# test workers: most of a test run waits on devices, brokers and timers, so more than the cores
JOBS    ?= 4

# Home Assistant's environment (tests_host/ha) and the OVMS integration release it runs
HAVENV  ?= .venv-ha
HA_STAMP := $(HAVENV)/.installed
OVMS_HA_TAG ?= v1.7.1
OVMS_HA := .cache/ha/ovms-home-assistant

.PHONY: deps ha-deps sim test test-ha bench vehicles firmware flash deploy package clean

$(STAMP): tools/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tools/requirements.txt
	touch $@

deps: $(STAMP)
	@sh tools/need_packages.sh

# The virtual device against a local TLS broker, replaying a real drive (Ctrl-C stops).
sim: deps
	$(PY) tools/sim.py

$(HA_STAMP): tests_host/ha/requirements.txt
	python3 -m venv $(HAVENV)
	$(HAVENV)/bin/pip install -q --disable-pip-version-check -r tests_host/ha/requirements.txt
	touch $@

ha-deps: deps $(HA_STAMP)

HA_PYTEST = $(HAVENV)/bin/pytest -q -p no:cacheprovider -o asyncio_mode=auto --confcutdir=tests_host/ha tests_host/ha

# Every test: host tools on CPython, device code on the micropython binary, a real mosquitto;
# then the module's discovery in a real Home Assistant (the OVMS integration's test runs when
# its source is here: make test-ha).
test: deps ha-deps
	$(VENV)/bin/pytest -q -n $(JOBS) tests_host
	$(HA_PYTEST)

# The module in a real Home Assistant: its MQTT discovery, and the OVMS integration (release
# $(OVMS_HA_TAG), downloaded from GitHub; OVMS_HA_SRC=<checkout> uses a local copy instead).
test-ha: ha-deps
	@if [ -z "$(OVMS_HA_SRC)" ] && [ ! -f $(OVMS_HA)/custom_components/ovms/manifest.json ]; then \
	  mkdir -p $(OVMS_HA) && curl -fsSL https://github.com/enoch85/ovms-home-assistant/archive/refs/tags/$(OVMS_HA_TAG).tar.gz \
	    | tar -xz --strip-components=1 -C $(OVMS_HA) \
	  || { rm -rf $(OVMS_HA); echo "test-ha: cannot download the OVMS integration $(OVMS_HA_TAG); set OVMS_HA_SRC=<checkout>"; exit 2; }; fi
	OVMS_HA_REQUIRE=1 OVMS_HA_SRC="$(OVMS_HA_SRC)" $(HA_PYTEST)

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
	rm -rf build .sim .pytest_cache .hypothesis .cache
