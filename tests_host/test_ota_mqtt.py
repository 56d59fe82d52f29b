"""`ovms.py ota push|status` over TLS MQTT against a device process running the OTA receiver on the
device MQTT client (micropython, .mpy code like `make deploy`): the transfer resumes
after a broker restart and a power cut, then the new version is committed; a bundle signed with
another key is refused. (The whole app on the virtual device: test_ota_vdev.py.)"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import deploy
from test_ota_helpers import broker, flash_root, keypair, make_full_app  # noqa: F401
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
            # 160K: the deployed app's names are all interned at boot (ota_boot), as the full
            # app needs them; this harness loads only part of the app
            self.proc = subprocess.Popen([MICROPYTHON, "-X", "heapsize=160K", self.script],
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
def dev(tmp_path, broker):
    d = Device(tmp_path, broker)
    yield d
    d.close()


def _ovms(broker, *args, env=None, timeout=300, wait=True):
    cmd = [sys.executable, os.path.join(TOOLS, "ovms.py"), "--mqtt",
           "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--user", "u",
           "--id", "V1", "--timeout", "3"] + list(args)
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
    assert "push 8.2.0 [" in err and "100%" in err                     # progress bar
    assert dev.boots >= 3                      # power cut + switch
    time.sleep(1.5)
    assert _published_version(broker) == "8.2.0"
    r = _ovms(broker, "ota", "status")
    assert "Running:  8.2.0 (slot a)" in r.stdout and "Previous: factory" in r.stdout
    # a bundle signed with another key is refused before anything is written
    r = _ovms(broker, "ota", "push", "--key-file", keypair("other")[0], _src(tmp_path, "8.4.0"))
    assert r.returncode == 1
    assert "error: signature verification failed" in r.stderr
    assert _published_version(broker) == "8.2.0"
