"""`ovms.py ota push|status` over TLS MQTT against a device process running the OTA receiver on the
device MQTT client (micropython, 100K heap, app compiled to .mpy like `make deploy`): version
switch, resume after broker restart and power cut, automatic rollback of a broken version."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import deploy
from test_ota_helpers import flash_root, keypair, make_full_app
from util import MICROPYTHON, REPO, TOOLS

PRE = "ovms/u/V1/"

# The device: boot selection, then the app: MQTT (TLS) up -> report healthy, OTA topics routed to
# the receiver, the running version published every second (retained).
DEVICE = r"""
import sys, asyncio
import ota_boot
ota_boot.ROOT = ROOT
slot = ota_boot.select()
try:
    import ovms
    from ovms import ota, mqtt
except Exception as e:
    print("CRASH", repr(e))
    ota_boot.crashed(e, 0)
print("BOOT", slot, ovms.VERSION, ota_boot.trial)

async def main():
    c = mqtt.MQTTClient("dev-V1", "localhost", PORT, ssl=mqtt.ssl_context(cafile=CA),
                        server_hostname="localhost", keepalive=10, backoff_max=1, stable=5)
    q = []
    ev = asyncio.Event()

    def cb(t, m, *a):
        if len(q) < 6:                      # bounded: the host resends what is dropped
            q.append((t, m))
            ev.set()

    async def reply(t, r):
        try:
            await c.publish(t, r, qos=1, timeout=10)
        except OSError:
            pass

    async def up(sp):
        await c.subscribe(PRE + "client/+/ota/+", 1)
        if ota.mark_healthy():
            print("COMMITTED", ovms.VERSION)
        import gc; gc.collect(); print("UP", gc.mem_free())

    c.set_callback(cb)
    c.on_up = up
    asyncio.create_task(c.run())
    asyncio.create_task(ota.guard())

    async def publisher():
        while True:
            if c.isconnected():
                try:
                    await c.publish(PRE + "metric/m/version", ovms.VERSION, retain=True)
                except OSError:
                    pass
            await asyncio.sleep(1)

    asyncio.create_task(publisher())
    rx = ota.receiver()
    while True:
        await ev.wait()
        ev.clear()
        while q:
            t, m = q.pop(0)
            w = t.decode().split("/")
            r = rx.handle(w[-1], m)
            t = PRE + "client/" + w[-3] + "/" + ota.REPLY
            if rx.reboot:
                await reply(t, r)
                await asyncio.sleep_ms(300)
                ota_boot.reset()
            asyncio.create_task(reply(t, r))    # do not wait for the PUBACK

asyncio.run(main())
"""


class Device:
    """Power supply for the device process: restarts it after machine.reset() (exit 99)."""

    def __init__(self, tmp, broker):
        self.root = flash_root(tmp)
        out = deploy.build(REPO, os.path.join(str(tmp), "deploy"), march="x64")
        deploy_lib = os.path.join(out, "lib")
        shutil.copytree(deploy_lib, os.path.join(self.root, "lib"))
        self.script = os.path.join(str(tmp), "device_mqtt.py")
        with open(self.script, "w") as f:
            f.write("import sys\nsys.path[:] = [\".frozen\", %r]\nROOT = %r\nPORT = %d\nCA = %r\nPRE = %r\n"
                    % (os.path.join(self.root, "lib"), self.root, broker.tls_port, broker.ca,
                       PRE) + DEVICE)
        self.log = []
        self.boots = 0
        self.proc = None
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self.wait_for("UP")

    def _run(self):
        while not self.stop:
            self.proc = subprocess.Popen([MICROPYTHON, "-X", "heapsize=100K", self.script],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
            self.boots += 1
            for line in self.proc.stdout:
                self.log.append(line.rstrip())
            self.proc.wait()
            self.log.append("EXIT %d" % self.proc.returncode)
            if self.proc.returncode not in (99, -9):
                break

    def wait_for(self, text, start=0, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            for ln in self.log[start:]:
                if ln.startswith(text):
                    return ln
            if not self.t.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError("device never printed %r:\n%s" % (text, "\n".join(self.log)))

    def power_cut(self):
        self.proc.kill()

    def close(self):
        self.stop = True
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        self.t.join(10)


@pytest.fixture
def broker():
    """A real mosquitto (TLS + plain, test CA) in a dir the broker can read: started as root it
    drops to the `mosquitto` user, which cannot enter pytest's private 0700 tmp_path."""
    from broker import Broker
    d = tempfile.mkdtemp(prefix="ota-broker-")
    os.chmod(d, 0o755)
    b = Broker(os.path.join(d, "b")).start()
    yield b
    b.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dev(tmp_path, broker):
    d = Device(tmp_path, broker)
    yield d
    d.close()


def _ovms(broker, *args, env=None, timeout=300, wait=True):
    cmd = [sys.executable, os.path.join(TOOLS, "ovms.py"), "--mqtt",
           "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--user", "u",
           "--vehicle", "V1", "--timeout", "3"] + list(args)
    e = dict(os.environ, OVMS_OTA_DEADLINE="30", **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=e)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def _published_version(broker):
    import paho.mqtt.client as mqtt
    got = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
    c.on_message = lambda cl, ud, m: got.append(m.payload.decode())
    c.connect("127.0.0.1", broker.port)
    c.subscribe(PRE + "metric/m/version")
    c.loop_start()
    end = time.time() + 10
    while not got and time.time() < end:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return got[-1] if got else None


def _src(tmp_path, version, crash=False):
    return make_full_app(str(tmp_path / ("src-" + version)), version, crash)


def test_push_over_tls_switches_version_and_device_keeps_publishing(tmp_path, broker, dev):
    key = keypair()[0]
    r = _ovms(broker, "ota", "status")
    assert r.returncode == 0, r.stderr + "\n".join(dev.log)
    assert "Running:  " in r.stdout and "(factory)" in r.stdout and "Staged:   -" in r.stdout
    n = len(dev.log)
    r = _ovms(broker, "ota", "push", "--key-file", key, _src(tmp_path, "8.1.0"))
    assert r.returncode == 0, r.stdout + r.stderr + "\n".join(dev.log)
    assert "version 8.1.0 staged in slot a" in r.stdout
    assert "version 8.1.0 committed (slot a)" in r.stdout
    assert "push 8.1.0 [" in r.stderr and "100%" in r.stderr       # progress bar
    assert dev.wait_for("BOOT", n) == "BOOT a 8.1.0 True"
    dev.wait_for("COMMITTED 8.1.0", n)
    time.sleep(1.5)
    assert _published_version(broker) == "8.1.0"
    r = _ovms(broker, "ota", "status")
    assert "Running:  8.1.0 (slot a)" in r.stdout and "Previous: factory" in r.stdout


def test_transfer_resumes_after_broker_restart_and_power_cut(tmp_path, broker, dev):
    key = keypair()[0]
    src = _src(tmp_path, "8.2.0")
    p = _ovms(broker, "ota", "push", "--key-file", key, src, wait=False,
              env={"OVMS_OTA_WINDOW": "1", "OVMS_OTA_CHUNK": "512"})
    stage = os.path.join(dev.root, "ota", "stage.json")
    end = time.time() + 60
    while time.time() < end:                   # header accepted, files arriving
        try:
            with open(stage) as f:
                if json.load(f).get("slot"):
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    time.sleep(0.5)
    broker.restart()
    time.sleep(1.0)
    dev.power_cut()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err + "\n".join(dev.log)
    assert "resuming at" in err
    assert "version 8.2.0 committed" in out
    assert dev.boots >= 3                      # power cut + switch
    assert _published_version(broker) == "8.2.0"


def test_broken_version_rolls_back_by_itself(tmp_path, broker, dev):
    key = keypair()[0]
    r = _ovms(broker, "ota", "push", "--key-file", key, _src(tmp_path, "8.3.0"))
    assert r.returncode == 0, r.stderr
    n = len(dev.log)
    r = _ovms(broker, "ota", "push", "--key-file", key, _src(tmp_path, "6.6.6", crash=True))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "version 6.6.6 staged in slot b" in r.stdout
    assert "error: update rolled back: 6.6.6 did not report healthy (RuntimeError: broken build " \
           "6.6.6): rolled back" in r.stderr
    assert "CRASH RuntimeError('broken build 6.6.6',)" in dev.log[n:]
    dev.wait_for("BOOT a 8.3.0 False", n)
    time.sleep(1.5)
    assert _published_version(broker) == "8.3.0"
    r = _ovms(broker, "ota", "status")
    assert "Running:  8.3.0 (slot a)" in r.stdout and "Last failure: 6.6.6" in r.stdout
    # a bundle signed with another key is refused before anything is written
    r = _ovms(broker, "ota", "push", "--key-file", keypair("other")[0], _src(tmp_path, "8.4.0"))
    assert r.returncode == 1
    assert "error: signature verification failed" in r.stderr
    assert _published_version(broker) == "8.3.0"
