"""End to end on the virtual device: `make deploy` onto a fresh module, provisioning, then
`ota push` of a new version over TLS MQTT switches versions while the module keeps publishing,
and a broken version rolls back by itself."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from test_ota_helpers import broker, keypair, make_full_app  # noqa: F401
from util import REPO, TOOLS, VDev

KONA_LOG = os.path.join(REPO, "firmware", "vehicles", "kn", "logs",
                        "230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz")
PRE = "ovms/u/V1/"
APP_FILES_HEAP = "160K"


def _source(tmp_path, version, crash=False):
    src = make_full_app(str(tmp_path / ("src-" + version)), version, crash)
    shutil.copytree(os.path.join(REPO, "firmware", "vehicles"),
                    os.path.join(src, "firmware", "vehicles"), ignore=shutil.ignore_patterns("logs"))
    return src


class Watch:
    """Retained/latest values of the module's topics, seen from a plain MQTT client."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt
        self.seen = {}
        self.count = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch")
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe(PRE + "metric/#")
        self.c.loop_start()

    def _msg(self, cl, ud, m):
        self.seen[m.topic] = m.payload.decode(errors="replace")
        self.count += 1

    def wait_new(self, n, timeout):
        """Wait for n more messages (the module keeps publishing)."""
        want = self.count + n
        end = time.time() + timeout
        while self.count < want and time.time() < end:
            time.sleep(0.2)
        assert self.count >= want, "only %d of %d new messages" % (self.count - want + n, n)

    def wait(self, topic, pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            v = self.seen.get(PRE + topic)
            if v is not None and pred(v):
                return v
            time.sleep(0.2)
        raise AssertionError("%s never matched; last %r" % (topic, self.seen.get(PRE + topic)))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _ovms(broker, *args, env=None, timeout=400):
    cmd = [sys.executable, os.path.join(TOOLS, "ovms.py"), "--mqtt",
           "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--user", "u",
           "--id", "V1", "--timeout", "5"] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_deploy_then_push_over_tls_switches_versions_and_bad_update_rolls_back(tmp_path, broker):
    key, pub = keypair()[0], keypair()[0] + ".pub"
    root = tmp_path / "flash"
    (root / "store").mkdir(parents=True)                # a freshly flashed, empty filesystem
    # The app runs from .mpy files here (deployed, then an OTA slot), not frozen, so its code
    # is in the heap (~160 KB on x86-64): this models a module with PSRAM, where the heap grows
    # into it. On a plain ESP32 (~110 KB heap) the app must be frozen: update it there with
    # `ota push --firmware` (tests_host/test_ota_esp32.py covers that path).
    d = VDev(root, can_log=KONA_LOG, speed=1.0, heap=APP_FILES_HEAP, extra=("--no-frozen",))
    d.start()
    w = Watch(broker)
    try:
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "deploy", "--port", d.pty,
                            "--arch", "auto"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", d.pty,
                            "provision", "--wifi", "car", "secret", "--mqtt-host", "localhost",
                            "--mqtt-port", str(broker.tls_port), "--mqtt-user", "u",
                            "--ca", broker.ca, "--type", "KN", "--id", "V1",
                            "--ota-pubkey", pub], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        factory = re.search(r'VERSION = "([^"]+)"',
                            open(os.path.join(REPO, "lib", "ovms", "__init__.py")).read()).group(1)
        w.wait("metric/m/version", lambda v: v.startswith(factory + "/f"), 120)
        w.wait("metric/s/v3/connected", lambda v: v == "yes", 60)

        # a new version over TLS MQTT: staged, switched, committed once healthy
        r = _ovms(broker, "ota", "push", "--key-file", key, _source(tmp_path, "9.1.0"),
                  env={"OVMS_OTA_DEADLINE": "150"})
        assert r.returncode == 0, r.stdout + r.stderr + d.console()[-3000:]
        assert "version 9.1.0 committed (slot a)" in r.stdout
        w.wait("metric/m/version", lambda v: v.startswith("9.1.0/a"), 60)
        w.wait_new(20, 90)                  # still decoding the CAN replay and publishing

        # a version that crashes at start: rolled back without anybody's help
        r = _ovms(broker, "ota", "push", "--key-file", key,
                  _source(tmp_path, "9.6.6", crash=True), env={"OVMS_OTA_DEADLINE": "15"})
        assert r.returncode == 1, r.stdout + r.stderr
        assert "version 9.6.6 staged in slot b" in r.stdout
        assert "update rolled back: 9.6.6 did not report healthy" in r.stderr
        w.wait("metric/m/version", lambda v: v.startswith("9.1.0/a"), 60)
        w.wait_new(20, 90)
        r = _ovms(broker, "ota", "status")
        assert "Running:  9.1.0 (slot a)" in r.stdout and "Previous: factory" in r.stdout
        assert "Last failure: 9.6.6 did not report healthy" in r.stdout
        assert (root / "store" / "ota.pub").read_text() == open(pub).read()   # config kept
    finally:
        w.close()
        d.stop()
