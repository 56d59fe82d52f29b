"""Home Assistant tests (make test-ha): a real Home Assistant (pytest-homeassistant-custom-component)
against the virtual device run by tools/sim.py (its broker, its replayed drive)."""
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# the project's own environment runs the virtual device (micropython, cantools, mosquitto tools)
PY = os.environ.get("MICRO_OVMS_PY", os.path.join(REPO, ".venv", "bin", "python"))
KN = os.path.join(REPO, "firmware", "vehicles", "kn")
KONA_LOG = os.path.join(KN, "logs", "230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz")
GPS_LOG = os.path.join(REPO, "tests_host", "data", "gps", "neo-m8n.log")

# The OVMS integration for Home Assistant (custom component "ovms", distributed from GitHub):
# OVMS_HA_SRC names a checkout (or unpacked release) with custom_components/ovms in it;
# `make test-ha` downloads the pinned release into .cache/ha/ovms-home-assistant.
OVMS_HA_VERSION = "v1.7.1"


def integration_source():
    for d in (os.environ.get("OVMS_HA_SRC"), os.path.join(REPO, ".cache", "ha", "ovms-home-assistant")):
        if d and os.path.isfile(os.path.join(d, "custom_components", "ovms", "manifest.json")):
            return os.path.abspath(d)
    return None


OVMS_SRC = integration_source()


@pytest.fixture
def ovms_integration(hass, enable_custom_integrations):
    """The integration made loadable: Home Assistant's loader looks into the package
    "custom_components", in these tests the harness's own (testing_config): it joins it."""
    try:
        import custom_components
    except ImportError:
        sys.path.insert(0, OVMS_SRC)
        import custom_components
    d = os.path.join(OVMS_SRC, "custom_components")
    if d not in list(custom_components.__path__):
        custom_components.__path__.append(d)

# vehicle commands with raw frames, added to the Kona definition for the test vehicle "HT":
# Home Assistant gets a button or number entity for each, and pressing it runs the shell command
COMMANDS = {
    "lock": [{"bus": "can0", "id": "0x7A0", "data": "0201"}],
    "unlock": [{"bus": "can0", "id": "0x7A0", "data": "0200"}],
    "climatecontrol.on": [{"bus": "can0", "id": "0x7A1", "data": "01"}],
    "climatecontrol.off": [{"bus": "can0", "id": "0x7A1", "data": "00"}],
    "charge.start": [{"bus": "can0", "id": "0x7A2", "data": "01"}],
    "charge.stop": [{"bus": "can0", "id": "0x7A2", "data": "00"}],
}


def make_vehicle(directory):
    """The Kona definition as vehicle "HT" (own metric prefix) with the commands above."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import vehicles
    return vehicles.derive(KN, directory, "HT", "Kona test vehicle with commands", COMMANDS)


async def until(pred, timeout=60, what=""):
    end = asyncio.get_running_loop().time() + timeout
    while True:
        r = pred()
        if r:
            return r
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.2)


async def watch_module(hass, sim, discovery):
    """Home Assistant's MQTT integration set up on the sim's broker (discovery on or off),
    watching the module's metric topics: returns (entry, {metric: payload}, unsubscribe)."""
    from homeassistant.components import mqtt
    from homeassistant.core import callback
    from pytest_homeassistant_custom_component.common import MockConfigEntry
    entry = MockConfigEntry(domain="mqtt", data={
        "broker": "127.0.0.1", "port": sim.port, "username": sim.user, "password": sim.password,
        "discovery": discovery})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    seen = {}

    @callback
    def on_metric(msg):
        seen[msg.topic[len(sim.prefix) + 7:].replace("/", ".")] = msg.payload
    return entry, seen, await mqtt.async_subscribe(hass, sim.prefix + "metric/#", on_metric)


class Sim:
    """tools/sim.py in the background: broker (plain listener for Home Assistant), virtual
    device with the test vehicle, replaying the Kona log, a GPS receiver."""

    def __init__(self, vid="HA1"):
        self.dir = tempfile.mkdtemp(prefix="ha-sim-")
        self.vid = vid
        veh = make_vehicle(os.path.join(self.dir, "vehicle"))
        self.proc = subprocess.Popen(
            [PY, os.path.join(REPO, "tools", "sim.py"), "--dir", self.dir, "--fresh", "--vehicle", veh,
             "--log", KONA_LOG, "--gps-log", GPS_LOG, "--id", vid],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out = []
        end = time.time() + 240
        while time.time() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            out.append(line)
            m = re.search(r"plain on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            m = re.search(r"user (\S+), password (\S+) ", line)
            if m:
                self.user, self.password = m.group(1), m.group(2)
            if line.startswith("Ctrl-C here"):
                break
        else:
            self.stop()
            raise RuntimeError("sim did not start:\n" + "".join(out))
        if not hasattr(self, "password"):
            self.stop()
            raise RuntimeError("sim did not start:\n" + "".join(out))
        self.prefix = "ovms/%s/%s/" % (self.user, vid)
        self.node = "ovms_" + vid.lower()

    def power_cut(self):
        """The firmware killed where it stands (the micropython process under the virtual
        board): its TCP link drops without a goodbye, the broker publishes its last will, and
        the board powers it on again, as after a brown-out."""
        vdev = subprocess.run(["pgrep", "-f", "vdev.py run --root %s/flash" % self.dir],
                              capture_output=True, text=True).stdout.split()
        kids = subprocess.run(["pgrep", "-P", ",".join(vdev)], capture_output=True,
                              text=True).stdout.split() if vdev else []
        assert kids, "no firmware process to cut"
        for pid in kids:
            os.kill(int(pid), signal.SIGKILL)

    def console(self):
        try:
            with open(os.path.join(self.dir, "console.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        end = time.time() + 10     # the device and the broker end with sim.py's group
        try:
            while time.time() < end:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.2)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not os.environ.get("HA_SIM_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sim():
    s = Sim()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _ha(mock_hass_config, socket_enabled):
    """Home Assistant's configuration.yaml empty (everything is set up from config entries);
    sockets allowed (the test harness blocks them), to 127.0.0.1 only: the sim's broker."""
    yield
