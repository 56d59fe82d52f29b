"""A real CAN log through the device pipeline (vehicle definition -> decoder -> metrics ->
v3 server) to a real mosquitto: every mapped metric arrives on its OVMS topic with the value
cantools decodes from the same log (the last value of the log, after the vehicle's mapping:
factor/add, value map, valid range)."""
import glob
import gzip
import os
import subprocess
import sys
import time

import pytest

from test_mqtt_kit import broker, dev_factory, peers  # noqa: F401
from util import MPY_CROSS, REPO

VEHICLES = os.path.join(REPO, "firmware", "vehicles")
PFX = "ovms/demo/CAR9/"


def vehicle_logs():
    out = []
    for vj in sorted(glob.glob(os.path.join(VEHICLES, "*", "vehicle.json"))):
        d = os.path.dirname(vj)
        for log in sorted(glob.glob(os.path.join(d, "logs", "*.log*"))):
            out.append((os.path.basename(d), log))
    return out


def expected_values(vdir, log):
    """metric -> expected value (number, bool or str) from cantools + the mapping."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import dbc2table
    mp = dbc2table.load_mapping(os.path.join(vdir, "vehicle.json"))
    dbs = {b: dbc2table.load_dbc(os.path.join(vdir, p)) for b, p in mp["buses"].items()}
    one_bus = next(iter(dbs)) if len(dbs) == 1 else None
    opener = gzip.open if log.endswith(".gz") else open
    # the last *accepted* value needs every frame of the message: collect them per message
    frames = {}
    with opener(log, "rt") as f:
        for line in f:
            p = line.split()
            if len(p) < 3 or p[1] not in dbs:
                continue
            ident, _, data = p[2].partition("#")
            if data[:1] in ("R", "r"):
                continue
            frames.setdefault((p[1], int(ident, 16)), []).append(bytes.fromhex(data))
    want = {}
    maybe = set()     # last frame out of the valid range: no value or the last valid one
    for name, e in mp["metrics"].items():
        bus = e.get("bus", one_bus)
        db = dbs[bus]
        m = e["message"]
        msg = db.get_message_by_frame_id(m) if isinstance(m, int) else db.get_message_by_name(m)
        sig = msg.get_signal_by_name(e["signal"])
        val = None
        for data in frames.get((bus, msg.frame_id), ()):
            if len(data) * 8 < sig.start + 1 and not msg.is_multiplexed():
                continue
            try:
                dec = msg.decode(data, decode_choices=True, allow_truncated=True,
                                 allow_excess=True)
                raw = msg.decode(data, decode_choices=False, allow_truncated=True,
                                 allow_excess=True)
            except Exception:
                continue
            if e["signal"] not in dec:
                continue
            v = dec[e["signal"]]
            r = raw[e["signal"]]
            if "map" in e:
                key = str(v) if not isinstance(v, (int, float)) else v
                mapped = None
                for k, mv in e["map"].items():
                    if k == str(key) or (not isinstance(key, str) and _num(k) == key):
                        mapped = mv
                        break
                if mapped is None:
                    continue
                v = mapped
            elif not isinstance(v, (int, float)):
                v = (str(v), r)                  # a VAL_ label (and the raw value for bools)
            else:
                v = v * e.get("factor", 1) + e.get("add", 0)
                lo_hi = e.get("valid")
                if lo_hi and not lo_hi[0] <= v <= lo_hi[1]:
                    maybe.add(name)
                    continue
                maybe.discard(name)
            val = v
        if val is not None:
            want[name] = val
    return want, maybe


def device_setup(vlib, store, port):
    """The device agent's setup: vehicle modules in vlib, config in store, the v3 server
    pointed at the test broker (plain MQTT, user demo, vehicle CAR9)."""
    return r'''
sys.path.insert(0, %r)
from ovms import config, metrics
from ovms.can import vehicle
config.init(%r)
config.update([("server.v3", "server", "127.0.0.1"), ("server.v3", "port", %d),
               ("server.v3", "tls", False), ("server.v3", "user", "demo"),
               ("vehicle", "id", "CAR9")])
from ovms.v3 import server as server_v3
''' % (str(vlib), str(store), port)


def _num(k):
    try:
        return float(k)
    except ValueError:
        return None


@pytest.mark.parametrize("code,log", vehicle_logs(), ids=lambda x: os.path.basename(str(x)))
def test_replayed_log_publishes_mapped_metrics(code, log, broker, dev_factory, peers, tmp_path):
    vdir = os.path.join(VEHICLES, code)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import vehicles
    import candecode
    vlib = tmp_path / "veh"
    py = vehicles.build(vdir, str(vlib), warn=lambda m: None)
    subprocess.run([MPY_CROSS, "-o", py[:-3] + ".mpy", py], check=True)
    os.remove(py)
    mp = vehicles.dbc2table.load_mapping(os.path.join(vdir, "vehicle.json"))
    # frames of the mapped buses as decoder batch records (bus index from "canN")
    plain = tmp_path / "log"
    with (gzip.open(log, "rt") if log.endswith(".gz") else open(log)) as f, open(plain, "w") as o:
        o.write(f.read())
    import struct
    frs = []
    for bus in mp["buses"]:
        frs += [(fr, int(bus[3:])) for fr in candecode.read_log(str(plain), bus=bus)]
    frs.sort(key=lambda x: x[0][0])
    chunks = bytearray()          # per chunk: <HH bytes, frames> + feed_batch records
    n = 0
    for k in range(0, len(frs), 200):
        part = b"".join(candecode.pack_records([fr], b) for fr, b in frs[k:k + 200])
        chunks += struct.pack("<HH", len(part), len(frs[k:k + 200])) + part
        n += 1
    rp = tmp_path / "recs.bin"
    rp.write_bytes(bytes(chunks))
    store = tmp_path / "store"
    store.mkdir()
    d = dev_factory(device_setup(vlib, store, broker.port), heap="512K")
    names = d.call("""
import struct
v = vehicle.load(%r)
buf = bytearray(4096)
hdr = bytearray(4)
with open(%r, "rb") as f:
    for _ in range(%d):
        f.readinto(hdr)
        nb, nf = struct.unpack("<HH", hdr)
        f.readinto(memoryview(buf)[:nb])
        v.decoder.feed_batch(buf, nf, metrics.uptime())
metrics.tick()
return {n: (metrics.typecode(n), metrics.text(n), metrics.precision(n)) for n in %r
        if metrics.defined(n)}
""" % (code, str(rp), n, list(mp["metrics"])), timeout=60)
    peer = peers(broker.port, subs=(PFX + "metric/#",))
    peer.settle()
    d.call("""
srv = server_v3.start()
while srv.state != "connected":
    await asyncio.sleep_ms(20)
""")
    want, maybe = expected_values(vdir, log)
    assert len(want) >= 5, want
    got = {}
    end = time.monotonic() + 10
    while time.monotonic() < end:
        got = {m[0][len(PFX) + 7:].replace("/", "."): m[1].decode() for m in peer.all()}
        if all(k in got for k in want):
            break
        time.sleep(0.1)
    bad = []
    for name, exp in sorted(want.items()):
        tc, text, prec = names.get(name, ("?", None, None))
        pub = got.get(name)
        if pub is None:
            if name not in maybe:
                bad.append((name, "not published", exp))
            continue
        assert pub == text, (name, pub, text)           # what the device holds, verbatim
        if isinstance(exp, tuple):           # VAL_ label: string metric, or raw value
            exp = exp[0] if tc == "s" else exp[1]
        if tc == "b":
            ok = pub == ("yes" if exp else "no")
        elif tc == "i":
            ok = int(pub) == round(float(exp))
        elif tc == "f":      # rounded to its display decimals, else to 6 significant digits
            tol = 0.5 * 10 ** -prec if prec is not None else 5e-6 * abs(float(exp))
            ok = abs(float(pub) - float(exp)) <= tol * (1 + 1e-9) + 1e-12
        else:
            ok = pub == str(exp)
        if not ok:
            bad.append((name, pub, exp))
    assert not bad, bad
    print("%s: %d mapped metrics checked against cantools" % (code, len(want)))


def test_a_value_outside_its_valid_range_clears_nothing_on_the_broker(broker, dev_factory, peers,
                                                                      tmp_path):
    """The Kona's 12 V reading leaves its valid range (0 V while the car powers up): the metric
    has no value then, and nothing is sent (OVMS sends no undefined metric): no empty payload
    that would delete the retained last value."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import candecode
    import dbc2table
    import vehicles
    vdir = os.path.join(VEHICLES, "kn")
    vlib = tmp_path / "veh"
    py = vehicles.build(vdir, str(vlib), warn=lambda m: None)
    subprocess.run([MPY_CROSS, "-o", py[:-3] + ".mpy", py], check=True)
    os.remove(py)
    msg = dbc2table.load_dbc(os.path.join(vdir, "pcan.dbc")).get_message_by_name("BatteryCharging")

    def rec(volts):
        sig = {s.name: 0 for s in msg.signals}
        sig["Voltage_12V"] = volts
        return candecode.pack_records([(0, "can0", msg.frame_id, 0, msg.encode(sig, strict=False))])
    store = tmp_path / "store"
    store.mkdir()
    d = dev_factory(device_setup(vlib, store, broker.port) + '''
v = vehicle.load("kn")
def feed(b):
    v.decoder.feed_batch(bytearray(b), 1, metrics.uptime())
    metrics.tick()
''', heap="512K")
    topic = PFX + "metric/v/b/12v/voltage"
    peer = peers(broker.port, subs=(topic,))
    peer.settle()
    d.call("global srv\nfeed(%r)\nsrv = server_v3.start()\nwhile srv.state != 'connected':\n"
           "    await asyncio.sleep_ms(20)" % rec(12.6))
    peer.wait_topic(topic, b"12.6", timeout=10)
    d.call("feed(%r)\nreturn metrics.get('v.b.12v.voltage')" % rec(0))
    assert d.call("return metrics.get('v.b.12v.voltage')") is None      # outside 6..18 V
    d.call("srv.update()")
    time.sleep(3)
    assert [m[1] for m in peer.all() if m[0] == topic] == [b"12.6"]      # no empty payload
    d.call("feed(%r)\nsrv.update()" % rec(13.1))
    peer.wait_topic(topic, b"13.1", timeout=10)
