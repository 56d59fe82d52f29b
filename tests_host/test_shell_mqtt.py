"""End to end: tools/ovms.py shell over mosquitto to a micropython device running ovms.v3.server
and ovms.shell (metric values back, secure gating per client id, vehicle command frames)."""
import os
import subprocess
import sys
import time

from test_mqtt_kit import broker, dev_factory, peers  # noqa: F401  (fixtures)

import ovms as ovms_cli
from util import LIB, REPO

HEAP = "256K"   # whole app on the x64 port (8-byte pointers: about twice the ESP32's heap)

SETUP = r'''
from ovms import config, metrics, shell
from ovms.v3 import server as server_v3
config.init(%(store)r)
config.update([("server.v3", "server", "127.0.0.1"), ("server.v3", "port", %(port)d),
               ("server.v3", "user", "bob"), ("server.v3", "ca", %(ca)r), ("vehicle", "id", "CAR1"),
               ("password", "module", "pw 1")] + %(extra)r)
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


def start_device(dev_factory, broker, tmp_path, extra=()):  # noqa: F811
    st = tmp_path / "store"
    st.mkdir()
    d = dev_factory(SETUP % {"store": str(st), "port": broker.tls_port, "ca": broker.ca,
                             "extra": list(extra)}, heap=HEAP)
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


SIGNED = [("server.v3", "commands", "signed")]


def test_metrics_and_vehicle_command_over_the_trusted_link(broker, dev_factory, tmp_path, capsys):  # noqa: F811
    """Default (as OVMS v3): commands over the authenticated broker link are trusted, so a
    client that never sends `enable` (the Home Assistant OVMS integration) can lock."""
    d = start_device(dev_factory, broker, tmp_path)
    rc, out, err = cli(capsys, broker, "shell", "metrics list v.b")
    assert rc == 0, err
    rows = [ln.split() for ln in out.strip().split("\n")]
    assert [(r[0], r[-1]) for r in rows] == [("v.b.c.voltage", "3.91,3.92V"), ("v.b.soc", "85.5%"),
                                            ("v.b.voltage", "380.25V")]
    rc, out, err = cli(capsys, broker, "shell", "lock")
    assert (rc, out) == (0, "Vehicle locked\n"), err
    _, f = d.wait_event(lambda e: e["ev"] == "frame", timeout=5)
    assert (f["bus"], f["id"], f["ext"], f["data"]) == (1, 0x60D, False, "010203")
    rc, out, err = cli(capsys, broker, "shell", "unlock")
    assert (rc, out) == (1, "Error: Unlock not available on this vehicle\n")
    # secrets never come back
    rc, out, err = cli(capsys, broker, "shell", "config list password")
    assert rc == 0 and "pw 1" not in out and "********" in out
    # a signed command (the CLI signs when it has the module password) runs too
    rc, out, err = cli(capsys, broker, "shell", "lock", env={"OVMS_MODULE_PASSWORD": "pw 1"})
    assert (rc, out) == (0, "Vehicle locked\n"), err + d.tail()
    assert len(d.evs("frame")) == 2


def test_signed_commands(broker, dev_factory, tmp_path, capsys, peers):  # noqa: F811
    """server.v3 commands signed: a secure command runs only with a valid HMAC of the module
    password, once (no replay, also not by another sender using the same client id); enable
    gives nothing; read-only commands need no signature."""
    import cli_link
    d = start_device(dev_factory, broker, tmp_path, SIGNED)
    rc, out, err = cli(capsys, broker, "shell", "lock")
    assert (rc, out) == (1, "Error: Secure command requires a signed command "
                            "(server.v3 commands signed)\n")
    rc, out, err = cli(capsys, broker, "shell", "metrics get v.b.soc")
    assert (rc, out) == (0, "85.5%\n")
    rc, out, err = cli(capsys, broker, "shell", 'enable "pw 1"')
    assert rc == 1 and "signed" in out
    rc, out, err = cli(capsys, broker, "shell", "lock", env={"OVMS_MODULE_PASSWORD": "nope"})
    assert (rc, out) == (1, "Error: Bad command signature\n")
    assert d.evs("frame") == []
    rc, out, err = cli(capsys, broker, "shell", "lock", env={"OVMS_MODULE_PASSWORD": "pw 1"})
    assert (rc, out) == (0, "Vehicle locked\n"), err
    # a recorded signed command, replayed by another sender under the same client id
    pfx = "ovms/bob/CAR1/client/app/"
    peer = peers(broker.port, subs=(pfx + "response/#",))
    peer.settle()
    signed = cli_link.sign("pw 1", "app", "c1", "lock", 1000)
    peer.publish(pfx + "command/c1", signed, qos=1)
    assert peer.wait_topic(pfx + "response/c1", timeout=10)[1] == b"Vehicle locked"
    peer.clear()
    peer.publish(pfx + "command/c1", signed, qos=1)
    assert peer.wait_topic(pfx + "response/c1", timeout=10)[1].startswith(b"Error: Replayed")
    # the same signature under another command id, client id or command text: refused
    for k, (cid, cmd, line) in enumerate([("app", "c2", "lock"), ("app2", "c1", "lock"),
                                          ("app", "c1", "unlock")]):
        body = signed.split(b"\n", 1)[0] + b"\n" + line.encode()
        t = "ovms/bob/CAR1/client/%s/command/%s" % (cid, cmd)
        peer2 = peers(broker.port, subs=("ovms/bob/CAR1/client/%s/response/%s" % (cid, cmd),))
        peer2.settle()
        peer2.publish(t, body, qos=1)
        r = peer2.wait_topic("ovms/bob/CAR1/client/%s/response/%s" % (cid, cmd), timeout=10)[1]
        assert r == b"Error: Bad command signature", (k, r)
    assert len(d.evs("frame")) == 2


def test_signed_counter_survives_reboot(broker, dev_factory, tmp_path, peers):  # noqa: F811
    import cli_link
    pfx = "ovms/bob/CAR1/client/app/"
    st = tmp_path / "store"
    st.mkdir()
    code = SETUP % {"store": str(st), "port": broker.tls_port, "ca": broker.ca, "extra": SIGNED}
    signed = cli_link.sign("pw 1", "app", "c1", "lock", 5000)
    replies = []
    for boot in range(2):
        d = dev_factory(code, heap=HEAP)
        d.call("await start()", timeout=30)
        peer = peers(broker.port, subs=(pfx + "response/#",))
        peer.settle()
        peer.publish(pfx + "command/c1", signed, qos=1)
        replies.append(peer.wait_topic(pfx + "response/c1", timeout=10)[1])
        d.kill()
    assert replies[0] == b"Vehicle locked"
    assert replies[1].startswith(b"Error: Replayed")


def test_flood_of_wrong_passwords_locks_nobody_out(broker, dev_factory, tmp_path, peers):  # noqa: F811
    """Concurrent senders flood wrong `enable`s and badly signed commands; the owner's signed
    commands and everyone's read-only commands are all answered meanwhile."""
    import threading
    import cli_link
    d = start_device(dev_factory, broker, tmp_path, SIGNED)
    P = "ovms/bob/CAR1/client/"
    stop = threading.Event()

    def flood(n):
        p = peers(broker.port)
        k = 0
        while not stop.is_set():
            k += 1
            p.publish(P + "evil%d/command/e%d" % (n, k), "enable guess%d" % k, qos=0)
            p.publish(P + "evil%d/command/s%d" % (n, k),
                      cli_link.sign("guess%d" % k, "evil%d" % n, "s%d" % k, "lock", k), qos=0)
            time.sleep(0.02)
    ts = [threading.Thread(target=flood, args=(n,)) for n in range(2)]
    for t in ts:
        t.start()
    try:
        time.sleep(1.0)
        owner = peers(broker.port, subs=(P + "owner/response/#",))
        owner.settle()
        got = {}
        for k in range(10):
            owner.publish(P + "owner/command/r%d" % k, "metrics get v.b.soc", qos=1)
            owner.publish(P + "owner/command/w%d" % k,
                          cli_link.sign("pw 1", "owner", "w%d" % k, "lock", 100 + k), qos=1)
            time.sleep(0.1)
        for k in range(10):
            got["r%d" % k] = owner.wait_topic(P + "owner/response/r%d" % k, timeout=15)[1]
            got["w%d" % k] = owner.wait_topic(P + "owner/response/w%d" % k, timeout=15)[1]
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert all(got["r%d" % k] == b"85.5%" for k in range(10)), got
    assert all(got["w%d" % k] == b"Vehicle locked" for k in range(10)), got
    assert len(d.evs("frame")) == 10


def test_interactive_session_signs_each_command(broker, dev_factory, tmp_path):  # noqa: F811
    d = start_device(dev_factory, broker, tmp_path, SIGNED)
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ovms.py"), "--mqtt",
                        "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--user", "bob",
                        "--id", "CAR1", "shell"],
                       input='lock\nmetrics get v.b.soc\nlock\nexit\n', capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, HOME=str(tmp_path), OVMS_MODULE_PASSWORD="pw 1"))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    k = 0
    for s in ("Vehicle locked", "85.5%", "Vehicle locked"):
        k = out.index(s, k) + len(s)
    _, f = d.wait_event(lambda e: e["ev"] == "frame", timeout=5)
    assert f["id"] == 0x60D


def test_oversized_messages_neither_drop_the_link_nor_go_unanswered(broker, dev_factory, tmp_path,
                                                                  capsys):  # noqa: F811
    """A retained 3 KB message on client/<x>/active (resent by the broker on every connect) is
    skipped without dropping the link; a 2.4 KB command is answered `Error: ... too long`."""
    from test_mqtt_kit import Peer
    pfx = "ovms/bob/CAR1/"
    peer = Peer(broker.port, subs=(pfx + "client/big/response/#",))
    try:
        peer.settle()
        peer.publish(pfx + "client/evil/active", b"x" * 3000, qos=1, retain=True)
        d = start_device(dev_factory, broker, tmp_path)
        topic, cmd = pfx + "client/big/command/7", "metrics list " + "v" * 2400
        peer.publish(topic, cmd, qos=1)
        m = peer.wait_topic(pfx + "client/big/response/7")
        size = 1 + 2 + 2 + len(topic) + 2 + len(cmd)      # the whole PUBLISH packet
        assert m[1] == b"Error: command too long (%d bytes, max 2048)" % size
        rc, out, err = cli(capsys, broker, "shell", "metrics get v.b.soc")
        assert (rc, out) == (0, "85.5%\n"), err
        st = d.call("return server_v3.server().client.connects, server_v3.status()")
        assert st[0] == 1, d.tail()
        assert "Skipped: 2 oversized incoming message(s)" in st[1]
        assert "link down" not in d.output()
    finally:
        peer.publish(pfx + "client/evil/active", b"", qos=1, retain=True)
        peer.c.loop_stop()
        peer.c.disconnect()


def test_long_replies_and_large_listings_arrive_whole(broker, dev_factory, tmp_path, capsys):  # noqa: F811
    """`config list usr` with 140 entries (over 16 KB) and `metrics list` come back whole over
    MQTT: the reply is streamed into one message, not cut at 4 KB nor refused by the outbox."""
    d = start_device(dev_factory, broker, tmp_path)
    d.call('for j in range(0, 140, 10):\n'
           '    config.update([("usr", "k%03d" % k, "v%03d-" % k + "x" * 110) for k in range(j, j + 10)])\n'
           '    __import__("gc").collect()')
    rc, out, err = cli(capsys, broker, "shell", "config list usr")
    assert rc == 0, (err, d.tail())
    lines = out.rstrip("\n").split("\n")
    assert len(out) > 16 * 1024
    assert "truncated" not in out
    assert lines[1:] == ["  k%03d: v%03d-%s" % (k, k, "x" * 110) for k in range(140)], lines[:3]
    n = d.call("return sum(1 for i in range(metrics.count()) if metrics.defined(i))")
    rc, out, err = cli(capsys, broker, "shell", "metrics list")
    assert rc == 0, err
    assert len(out.rstrip("\n").split("\n")) >= n and "truncated" not in out
    # a short reply is still a plain reply
    rc, out, err = cli(capsys, broker, "shell", "metrics get v.b.soc")
    assert (rc, out) == (0, "85.5%\n")


def test_signed_mode_ota_reboot_needs_a_signature(broker, dev_factory, tmp_path, peers):  # noqa: F811
    """With server.v3 commands signed, OTA begin/abort/reboot follow the command rules."""
    import json
    import cli_link
    d = start_device(dev_factory, broker, tmp_path, SIGNED)
    (tmp_path / "ota").mkdir()
    d.call("import sys\nsys.path.append(%r)\nimport ota_boot\nota_boot.ROOT = %r"
           % (LIB, str(tmp_path)))          # the OTA receiver's flash: a temp dir
    P = "ovms/bob/CAR1/client/x/"
    p = peers(broker.port, subs=(P + "ota-reply",))
    p.settle()
    p.publish(P + "ota/reboot", b"{}", qos=1)
    r = json.loads(p.wait_topic(P + "ota-reply", timeout=15)[1])
    assert r == {"op": "reboot", "error": "signed request required (server.v3 commands signed)"}
    p.clear()
    p.publish(P + "ota/reboot", cli_link.sign("wrong", "x", "ota/reboot", b"{}", 7), qos=1)
    r = json.loads(p.wait_topic(P + "ota-reply", timeout=15)[1])
    assert r == {"op": "reboot", "error": "Error: Bad command signature"}
    p.clear()
    p.publish(P + "ota/abort", cli_link.sign("pw 1", "x", "ota/abort", b"{}", 8), qos=1)
    r = json.loads(p.wait_topic(P + "ota-reply", timeout=15)[1])
    assert r == {"op": "abort", "ok": True}
    p.clear()
    p.publish(P + "ota/status", b"{}", qos=1)                  # read-only: no signature needed
    r = json.loads(p.wait_topic(P + "ota-reply", timeout=15)[1])
    assert r["op"] == "status" and "error" not in r
