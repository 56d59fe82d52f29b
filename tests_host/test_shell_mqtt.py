"""End to end: tools/ovms.py shell over mosquitto to a micropython device running ovms.server_v3
and ovms.shell (metric values back, secure gating per client id, vehicle command frames)."""
import os
import subprocess
import sys
import time

from test_mqtt_kit import broker, dev_factory  # noqa: F401  (fixtures)

import ovms as ovms_cli
from util import REPO

HEAP = "256K"   # whole app on the x64 port (8-byte pointers: about twice the ESP32's heap)

SETUP = r'''
from ovms import config, metrics, shell, server_v3
config.init(%(store)r)
config.update([("server.v3", "server", "127.0.0.1"), ("server.v3", "port", %(port)d),
               ("server.v3", "user", "bob"), ("server.v3", "ca", %(ca)r), ("vehicle", "id", "CAR1"),
               ("password", "module", "pw 1")])
for n, v in (("v.b.soc", 85.5), ("v.b.voltage", 380.25), ("v.b.c.voltage", [3.91, 3.92]), ("v.e.locked", False)):
    metrics.set(n, v)
class Vehicle:
    def command_frames(self, name, args):
        if name == "lock":
            return [(1, 0x60D, False, b"\x01\x02\x03")]
        return None
V = Vehicle()
shell.hook("vehicle", lambda: V)
def can_send(bus, fid, ext, data):
    ev("frame", bus=bus, id=fid, ext=ext, data=data.hex())
    return True
shell.hook("can_send", can_send)
async def start():
    srv = server_v3.start()
    while srv.state != "connected":
        await asyncio.sleep_ms(50)
    ev("up")
'''


def start_device(dev_factory, broker, tmp_path):  # noqa: F811
    st = tmp_path / "store"
    st.mkdir()
    d = dev_factory(SETUP % {"store": str(st), "port": broker.tls_port, "ca": broker.ca}, heap=HEAP)
    d.call("await start()", timeout=30)
    return d


def cli(capsys, broker, *argv, env=None):  # noqa: F811
    old = dict(os.environ)
    os.environ.pop("OVMS_MODULE_PASSWORD", None)
    os.environ.update(env or {})
    try:
        rc = ovms_cli.main(["--mqtt", "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca,
                            "--user", "bob", "--id", "CAR1", "--timeout", "15"] + list(argv))
    finally:
        os.environ.clear()
        os.environ.update(old)
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_metrics_and_secure_vehicle_command_end_to_end(broker, dev_factory, tmp_path, capsys):  # noqa: F811
    d = start_device(dev_factory, broker, tmp_path)
    rc, out, err = cli(capsys, broker, "shell", "metrics list v.b")
    assert rc == 0, err
    rows = [ln.split() for ln in out.strip().split("\n")]
    assert [(r[0], r[-1]) for r in rows] == [("v.b.c.voltage", "3.91,3.92V"), ("v.b.soc", "85.5%"),
                                            ("v.b.voltage", "380.25V")]
    # lock without enable: refused, nothing on the bus
    rc, out, err = cli(capsys, broker, "shell", "lock")
    assert (rc, out) == (1, "Error: Secure command requires 'enable' mode\n")
    # secure mode is per client id: enabling in one invocation does not carry over
    rc, out, err = cli(capsys, broker, "shell", "enable pw 1")
    assert rc == 1 and out.startswith("Usage: enable")          # the password has a space: quote it
    rc, out, err = cli(capsys, broker, "shell", 'enable "pw 1"')
    assert (rc, out) == (0, "Secure mode\n")
    rc, out, err = cli(capsys, broker, "shell", "lock")
    assert rc == 1
    assert d.evs("frame") == []
    # with the password in the environment the CLI enables first on the same connection
    rc, out, err = cli(capsys, broker, "shell", "lock", env={"OVMS_MODULE_PASSWORD": "pw 1"})
    assert (rc, out) == (0, "Vehicle locked\n"), err
    _, f = d.wait_event(lambda e: e["ev"] == "frame", timeout=5)
    assert (f["bus"], f["id"], f["ext"], f["data"]) == (1, 0x60D, False, "010203")
    rc, out, err = cli(capsys, broker, "shell", "unlock", env={"OVMS_MODULE_PASSWORD": "pw 1"})
    assert (rc, out) == (1, "Error: Unlock not available on this vehicle\n")
    # secrets never come back
    rc, out, err = cli(capsys, broker, "shell", "config list password")
    assert rc == 0 and "pw 1" not in out and "********" in out
    # a wrong password: refused after the 5 s penalty, the command is not sent
    t = time.monotonic()
    rc, out, err = cli(capsys, broker, "shell", "lock", env={"OVMS_MODULE_PASSWORD": "nope"})
    assert rc == 1 and "Invalid password" in err and out == ""
    assert time.monotonic() - t >= 4.5
    assert len(d.evs("frame")) == 1


def test_interactive_session_keeps_secure_mode(broker, dev_factory, tmp_path):  # noqa: F811
    d = start_device(dev_factory, broker, tmp_path)
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ovms.py"), "--mqtt",
                        "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--user", "bob",
                        "--id", "CAR1", "shell"],
                       input='lock\nenable "pw 1"\nlock\nmetrics get v.b.soc\nexit\n', capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, HOME=str(tmp_path)))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    k = 0
    for s in ("Error: Secure command requires 'enable' mode", "Secure mode", "Vehicle locked", "85.5%"):
        k = out.index(s, k) + len(s)
    _, f = d.wait_event(lambda e: e["ev"] == "frame", timeout=5)
    assert f["id"] == 0x60D
