"""tools/ovms.py --port against the virtual device's pty: config, shell, provision, power cuts."""
import os
import random
import subprocess
import sys
import threading
import time

import pytest

import cli_serial
from test_config_powercut import GEN_CODE
from util import TOOLS

VDEV = os.path.join(TOOLS, "vdev.py")
OVMS = os.path.join(TOOLS, "ovms.py")
HEAP = "100K"


class VDev:
    """A virtual device on a flash directory; kill() is a power cut, start() the next power-on."""

    def __init__(self, d):
        self.dir = d
        self.root = d / "flash"
        self.pty = str(d / "pty")
        self.p = None

    def start(self):
        log = open(self.dir / "vdev.log", "ab")
        self.p = subprocess.Popen([sys.executable, VDEV, "run", "--root", str(self.root), "--pty", self.pty,
                                   "--heap", HEAP, "--log", str(self.dir / "console.log")],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        while True:
            line = self.p.stdout.readline()
            assert line, "vdev exited: %s" % (self.dir / "vdev.log").read_text()[-2000:]
            if line.startswith("pty:"):
                break
        threading.Thread(target=self.p.stdout.read, daemon=True).start()
        return self

    def console(self):
        """What the device printed (all power-ons) and the virtual device's own log."""
        try:
            return ((self.dir / "console.log").read_bytes().decode(errors="replace")
                    + "\n--- vdev ---\n" + (self.dir / "vdev.log").read_text(errors="replace"))
        except OSError:
            return ""

    def kill(self):
        if self.p and self.p.poll() is None:
            self.p.kill()
        if self.p:
            self.p.wait(timeout=10)

    def cli(self, *args, timeout=60):
        return subprocess.run([sys.executable, OVMS, "--port", self.pty, *args], capture_output=True,
                              text=True, timeout=timeout)

    def store(self, name="ovms.cfg"):
        return self.root / "store" / name


@pytest.fixture
def vdev(tmp_path):
    v = VDev(tmp_path).start()
    yield v
    v.kill()


def running(v):
    """True if the firmware (main.py's app) is running: Ctrl-C interrupts it rather than finding
    an idle REPL. The probe restarts it again afterwards."""
    d = cli_serial.Device(v.pty, 10)
    r = d.was_running
    d.close(reset=r)
    return r


def test_config_and_shell_over_the_pty(vdev):
    r = vdev.cli("config", "set", "vehicle", "id", "DEMO")
    assert (r.returncode, r.stdout) == (0, "Parameter has been set.\n"), r.stderr
    r = vdev.cli("config", "get", "vehicle", "id")
    assert (r.returncode, r.stdout) == (0, "DEMO\n")
    r = vdev.cli("shell", "config list vehicle")
    assert r.returncode == 0 and "vehicle (readable writeable)\n" in r.stdout and "  id: DEMO\n" in r.stdout
    r = vdev.cli("config", "set", "wifi.ssid", "Cafe Net", "pass word")
    assert r.returncode == 0
    r = vdev.cli("config", "list", "wifi.ssid")
    assert r.returncode == 0 and "  Cafe Net: ********\n" in r.stdout and "pass word" not in r.stdout
    # device-reported errors: message on stdout, exit code 1
    r = vdev.cli("config", "set", "server.v3", "port", "abc")
    assert (r.returncode, r.stdout) == (1, "Error: Invalid value 'abc' for server.v3 port: expected an integer 0..65535\n")
    r = vdev.cli("shell", "frobnicate")
    assert r.returncode == 1 and r.stdout.startswith("Unrecognised command")
    r = vdev.cli("shell", "config set vehicle")
    assert r.returncode == 1 and r.stdout.startswith("Usage:")
    # it is on the flash, and the firmware was restarted after each command
    assert "vehicle\tid\tDEMO\n" in vdev.store().read_text()
    assert running(vdev)


def test_provision_survives_a_power_cycle(vdev, tmp_path):
    from broker import make_ca
    ca = make_ca(str(tmp_path / "ca"))["ca.pem"]
    r = vdev.cli("provision", "--wifi", "Home Net", "wifipass1", "--mqtt-host", "127.0.0.1",
                 "--mqtt-port", "18883", "--mqtt-user", "alice", "--mqtt-password", "s3cret",
                 "--ca", ca, "--type", "NL", "--id", "LEAF1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "s3cret" not in r.stdout and "wifipass1" not in r.stdout
    assert "password server.v3: ********" in r.stdout
    assert r.stdout.endswith("soft reset: done\n")
    with open(ca, "rb") as f:
        assert vdev.store("ca.pem").read_bytes() == f.read()
    assert running(vdev)  # the soft reset started the firmware again
    vdev.kill()            # power cut, then power on
    vdev.start()
    r = vdev.cli("config", "list", "server.v3")
    assert r.returncode == 0
    for line in ("  server: 127.0.0.1", "  port: 18883", "  user: alice", "  tls: yes", "  ca: /store/ca.pem"):
        assert line + "\n" in r.stdout
    r = vdev.cli("config", "list", "password")
    assert r.returncode == 0 and "  server.v3: ********\n" in r.stdout and "s3cret" not in r.stdout
    r = vdev.cli("shell", "config list vehicle")
    assert "  id: LEAF1\n" in r.stdout and "  type: NL\n" in r.stdout
    r = vdev.cli("config", "get", "wifi.ssid", "Home Net")
    assert r.returncode == 1 and "write-only" in r.stdout


def test_provision_refuses_bad_values_and_keeps_the_config(vdev):
    assert vdev.cli("config", "set", "vehicle", "id", "KEEP").returncode == 0
    r = vdev.cli("provision", "--mqtt-host", "h.example", "--mqtt-port", "70000", "--id", "NEW",
                 "--insecure-plain-mqtt")
    assert r.returncode == 1
    assert r.stdout == "Error: Invalid value '70000' for server.v3 port: expected an integer 0..65535\n"
    assert "soft reset" not in r.stdout
    r = vdev.cli("config", "get", "vehicle", "id")
    assert r.stdout == "KEEP\n"


WRITE_LOOP = """
from ovms import config
config.load()
g = consistent(config)
while True:
    g += 1
    write(config, g)
"""

CHECK = """
from ovms import config
import os
try:
    names = os.listdir('/store')
except OSError:
    names = []
print(repr((config.load(), consistent(config), [n for n in names if 'corrupt' in n])))
"""


def test_power_cut_during_config_writes_on_the_virtual_device(tmp_path):
    """Kill the virtual device (power cut) at random moments while its firmware rewrites the
    config in a loop; every power-on finds a complete, valid generation, never an older one."""
    rnd = random.Random(77)
    v = VDev(tmp_path)
    last = 0
    gens = []
    try:
        for n in range(10):
            v.start()
            d = None
            try:
                try:
                    d = cli_serial.Device(v.pty, 20)
                    w, g, corrupt = eval(d.exec(GEN_CODE + CHECK).strip())
                except cli_serial.LinkError as e:
                    raise AssertionError("%s\nconsole:\n%s" % (e, v.console()[-3000:]))
                if n == 0:  # first power-on of an empty flash
                    w = [x for x in w if not x.startswith("config: no config in /store yet")]
                assert corrupt == [] and w == [], (w, corrupt)
                assert g >= last, (g, last)
                last = g
                gens.append(g)
                d.t.exec_raw_no_follow(GEN_CODE + WRITE_LOOP)
                time.sleep(rnd.uniform(0.05, 0.4))
            finally:
                v.kill()  # power cut mid-write
                try:
                    d and d.t.serial.close()
                except OSError:
                    pass
        v.start()
        d = cli_serial.Device(v.pty, 20)
        w, g, corrupt = eval(d.exec(GEN_CODE + CHECK).strip())
        d.close()
        assert (w, corrupt) == ([], []) and g >= last
    finally:
        v.kill()
    print("virtual device power cuts: 10, generations seen at power-on: %s" % gens)
    assert g > gens[1] > 0  # the cuts landed while the device was writing
