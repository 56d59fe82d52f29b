"""End to end: provisioned virtual device replaying a real drive, TLS mosquitto, paho client."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from mqttpeer import Client  # noqa: F401  (the owner's client, also used by test_soak)
from util import REPO, TOOLS, VDev

DRIVE = os.path.join(REPO, "firmware", "vehicles", "rv", "logs", "comma2k19_rav4_seg40.log.gz")
HEAP = "100K"  # the ESP32's heap (vdev scales it to the host's word size)


def ovms(*args, timeout=120):
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def make_vehicle(tmp_path):
    """The RAV4 definition plus a raw lock/unlock frame (a test vehicle, not a real car's)."""
    sys.path.insert(0, TOOLS)
    import vehicles
    return vehicles.derive(os.path.join(REPO, "firmware", "vehicles", "rv"), str(tmp_path / "veh"), "TX",
                           commands={"lock": [{"bus": "can0", "id": "0x750", "data": "0211"}],
                                     "unlock": [{"bus": "can0", "id": "0x750", "data": "0212"}]})


@pytest.fixture
def device(tmp_path, broker):
    sys.path.insert(0, TOOLS)
    import vehicles
    root = tmp_path / "flash"
    (root / "lib").mkdir(parents=True)
    for f in ("boot.py", "main.py"):
        shutil.copy(os.path.join(REPO, f), root)
    os.remove(vehicles.build(str(make_vehicle(tmp_path)), str(root / "lib"), mpy=True))
    d = VDev(root, can_log=DRIVE, heap=HEAP).start()
    try:        # a failed set-up must not leave the device running
        ovms("--port", d.pty, "config", "set", "password", "module", "s3cret")
        ovms("--port", d.pty, "config", "set", "vehicle", "can.mode", "normal")
        ovms("--port", d.pty, "provision", "--wifi", "car", "wifipw", "--mqtt-host", "localhost",
             "--mqtt-port", str(broker.tls_port), "--ca", broker.ca, "--type", "TX",
             "--id", "E2E")
        yield d
    finally:
        d.stop()


def test_drive_publishes_and_commands_work_over_tls(device, broker):
    c = Client(broker, "ovms//E2E/")
    try:
        c.wait("metric/s/v3/connected", lambda v: v == "yes")
        speed = float(c.wait("metric/v/p/speed"))
        assert 0 <= speed < 120  # km/h: the drive is 8-20 m/s
        odo = float(c.wait("metric/v/p/odometer"))
        assert odo > 1000
        out = c.command("metrics list v.p")
        assert "v.p.speed" in out and "km/h" in out
        # commands over the authenticated broker link are trusted (as OVMS v3): no enable
        assert not os.path.exists(device.tx_log) or "750#" not in open(device.tx_log).read()
        assert "Vehicle locked" in c.command("lock")
        end = time.time() + 10
        while time.time() < end and not (os.path.exists(device.tx_log)
                                         and "750#0211" in open(device.tx_log).read()):
            time.sleep(0.1)
        assert "can0 750#0211" in open(device.tx_log).read()
        assert "Unrecognised command" in c.command("frobnicate")
    finally:
        c.close()


def test_hung_task_resets_the_module_and_is_logged(tmp_path, broker):
    root = tmp_path / "flash"
    d = VDev(root, can_log=DRIVE, heap=HEAP).start()
    try:
        ovms("--port", d.pty, "config", "set", "module", "watchdog.timeout", "5")
        ovms("--port", d.pty, "provision", "--wifi", "car", "wifipw", "--mqtt-host", "localhost",
             "--mqtt-port", str(broker.tls_port), "--ca", broker.ca, "--type", "RV",
             "--id", "WDT")
        c = Client(broker, "ovms//WDT/")
        try:
            c.wait("metric/s/v3/connected", lambda v: v == "yes")
            out = c.command("module watchdog")
            assert "can" in out and "mqtt" in out
            assert "resets the module" in c.command("module watchdog test can")
            # the module stops feeding the WDT; the board resets and comes back
            c.wait("metric/s/v3/connected", lambda v: v == "no", timeout=40)
            c.wait("metric/s/v3/connected", lambda v: v == "yes", timeout=60)
            log = c.command("module crashlog")
            assert "watchdog: task can stopped making progress" in log
        finally:
            c.close()
        out = ovms("--port", d.pty, "shell", "module info")
        assert "Firmware" in out
    finally:
        d.stop()


def test_wifi_loss_and_return(device, broker):
    c = Client(broker, "ovms//E2E/")
    try:
        c.wait("metric/s/v3/connected", lambda v: v == "yes")
        assert c.command("metrics get m.net.connected").strip().endswith("yes")
        assert device.control("wifi 0") == "ok"
        time.sleep(4)  # the station notices within its 2 s poll
        assert device.control("wifi 1") == "ok"
        c.wait("event/network/down", timeout=30)
        c.wait("event/network/up", timeout=60)
        assert c.command("metrics get m.net.connected").strip().endswith("yes")
    finally:
        c.close()
