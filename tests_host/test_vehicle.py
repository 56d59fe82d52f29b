"""Vehicle definitions: host build, device load, real logs decoded into plausible metrics."""
import csv
import glob
import json
import os

import pytest

from util import REPO, compiled_lib, data, reference, run_mpy

import vehicles
from dbc2table import CompileError

VEH = os.path.join(REPO, "firmware", "vehicles")
KONA_LOG = data("kona_ev/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log")
KONA21_LOG = data("kona_ev/logs/221217-1-2021-pcan-bcan-no-key.log")
RAV4 = "toyota_rav4_comma2k19"
RAV4_LOG = data(RAV4 + "/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Vehicle modules built from firmware/vehicles (.py and .mpy)."""
    out = str(tmp_path_factory.mktemp("veh"))
    for d in vehicles.vehicle_dirs(VEH):
        os.remove(vehicles.build(d, out, mpy=True))      # .py would be imported first
    return out


def mpy(code, built, **kw):
    """Run code with the precompiled lib and the vehicle modules in `built` on sys.path."""
    return run_mpy(code, path=(compiled_lib(), built), **kw)


# ---- the definitions themselves -------------------------------------------------

def test_every_vehicle_has_dbc_license_and_readme():
    dirs = vehicles.vehicle_dirs(VEH)
    assert len(dirs) >= 2
    for d in dirs:
        mp = json.load(open(os.path.join(d, "vehicle.json")))
        for dbc in mp["buses"].values():
            assert os.path.exists(os.path.join(d, dbc)), dbc
        assert glob.glob(os.path.join(d, "LICENSE*")), d
        readme = open(os.path.join(d, "README.md")).read()
        assert "http" in readme and "licen" in readme.lower(), d


def test_definitions_compile_and_map_standard_metrics():
    std = vehicles.standard_metrics()
    for d in vehicles.vehicle_dirs(VEH):
        v = vehicles.compile_vehicle(d)
        names = [m[0] for m in v["metrics"]] + [x[0] for x in v["derived"]]
        standard = [n for n in names if n in std]
        assert len(standard) >= 10, (d, standard)
        for n in names:
            assert n in std or n.startswith("x%s." % v["code"].lower()), n


def _expect(vdir, log, bus="can0"):
    """Last value of every mapped metric according to cantools' reference decode."""
    mp = json.load(open(os.path.join(vdir, "vehicle.json")))
    last, labels = {}, {}
    for r in reference(log, bus, os.path.join(vdir, mp["buses"][bus])):
        for s, v in r["signals"].items():
            last[(r["msg"], s)] = v
            labels[(r["msg"], s)] = r.get("choices", {}).get(s)
    std = vehicles.standard_metrics()
    types = {row[0]: row[1] for row in vehicles.compile_vehicle(vdir)["metrics"]}
    from dbc2table import load_dbc
    db = load_dbc(os.path.join(vdir, mp["buses"][bus]))
    for name, src in mp["metrics"].items():
        if types.get(name) is None and name not in vehicles.standard_metrics():
            sig = db.get_message_by_name(src["message"]).get_signal_by_name(src["signal"])
            types[name] = vehicles._infer_type(sig, src)
    out = {}
    for name, src in mp["metrics"].items():
        key = (src["message"], src["signal"])
        if key not in last:
            continue
        v = last[key]
        t = std[name][0] if name in std else types[name]
        if t == "s" and "map" not in src and labels[key] is not None:
            v = labels[key]
        elif "map" in src:
            k = labels[key] if labels[key] is not None else str(v)
            v = src["map"].get(k, src["map"].get(str(float(v)) if not isinstance(v, str) else k))
        else:
            v = v * src.get("factor", 1) + src.get("add", 0)
            if "valid" in src and not src["valid"][0] <= v <= src["valid"][1]:
                v = None
            elif t == "i":
                v = round(v)        # int metrics (e.g. v.m.rpm) round the physical value
        out[name] = (v, t)
    return out


def _replay(vcode, log, built, bus="can0", extra=""):
    return mpy("""
import json
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load(%r)
dec = v.decoder
n = 0
for line in open(%r):
    p = line.split()
    if p[1] != %r:
        continue
    i, d = p[2].split("#")
    b = bytes.fromhex(d)
    dec.feed(0, int(i, 16), len(i) > 3, b, len(b), m.uptime())
    n += 1
m.tick()
for i in range(m.count()):
    if m.defined(i):
        print(json.dumps([m.name(i), m.get(i), m.text(i), m.unit(i)]))
print("end")
%s
""" % (vcode, log, bus, extra), built, heap="100K")


def replay(vcode, log, built):
    """{metric: [value, text, unit]} of every defined metric after replaying log."""
    out = {}
    for line in _replay(vcode, log, built).stdout.split("\n"):
        if line == "end":
            break
        r = json.loads(line)
        out[r[0]] = r[1:]
    return out


@pytest.mark.parametrize("vcode,vdir,log", [
    ("KN", "kn", KONA_LOG),
    ("KN", "kn", KONA21_LOG),
    ("RV", "rv", RAV4_LOG),
], ids=["kona-230112-7", "kona-221217-1", "rav4-seg40"])      # stable ids: the paths are temporary
def test_real_log_gives_cantools_values(built, vcode, vdir, log):
    got = replay(vcode, log, built)
    want = _expect(os.path.join(VEH, vdir), log)
    assert len(want) >= 10
    checked = 0
    for name, (v, t) in want.items():
        if v is None:
            assert name not in got, name
            continue
        g = got[name][0]
        if t == "b":
            assert g is (bool(v)), (name, g, v)
        elif t == "s" and isinstance(v, str):
            assert g == v, (name, g, v)
        elif isinstance(g, (int, float)) and not isinstance(g, bool):
            assert g == pytest.approx(v, rel=1e-9, abs=1e-9), (name, g, v)
        else:
            assert g == v, (name, g, v)
        checked += 1
    assert checked >= 10
    assert got["v.type"][0] == vcode


def test_kona_values_are_plausible(built):
    got = replay("KN", KONA_LOG, built)
    soc = got["v.b.soc"][0]
    assert 0 <= soc <= 100 and got["v.b.soc"][2] == "%"
    assert 250 <= got["v.b.voltage"][0] <= 420 and got["v.b.voltage"][2] == "V"
    assert -400 <= got["v.b.current"][0] <= 400
    assert got["v.p.odometer"][0] > 1000 and got["v.p.odometer"][2] == "km"
    assert 50 <= got["v.b.range.est"][0] <= 600
    assert got["v.e.gear"][0] in (-1, 0, 1)
    assert -40 <= got["v.b.temp"][0] <= 60 and got["v.b.temp"][2] == "\u00b0C"
    assert got["v.b.range.est"][0] == got["xkn.b.range.2km"][0] + got["xkn.b.range.lsb"][0]
    # power derived from V x I with the OVMS sign convention (+ = discharge)
    assert got["v.b.power"][0] == pytest.approx(got["v.b.voltage"][0] * got["v.b.current"][0] / 1000)
    # the 12 V reading is 0 (invalid) once the car is off: not reported
    assert "v.b.12v.voltage" not in got
    for n in ("v.d.fl", "v.d.fr", "v.d.rl", "v.d.rr", "v.d.trunk", "v.d.hood"):
        assert got[n][1] == "no"


def test_kona_2021_no_key_log(built):
    # the car stays off: body and gateway frames only, so battery metrics stay undefined
    got = replay("KN", KONA21_LOG, built)
    assert "v.b.soc" not in got and "v.b.voltage" not in got
    assert got["v.p.odometer"][0] > 100 and got["v.p.speed"][0] == 0
    assert got["v.d.fl"][1] in ("yes", "no") and got["v.e.on"][1] == "no"


def test_rav4_speed_matches_comma_wheel_speeds(built):
    # comma's processed wheel speeds (m/s, decoded independently by comma.ai) at every
    # 400th sample vs the device's xrv.p.wheel.* (km/h) right after the frame at that time
    rows = list(csv.DictReader(open(data(RAV4 + "/crosscheck/comma_processed_wheel_speed_mps.csv"))))
    checks = {round(float(r["t"]), 6): r for r in rows[::400]}
    lines = open(RAV4_LOG).read().split("\n")
    feed = []
    for ln in lines:
        p = ln.split()
        if len(p) != 3 or p[1] != "can0":
            continue
        t = round(float(p[0].strip("()")), 6)
        feed.append(p[2])
        if t in checks and p[2].startswith("0AA#"):
            feed.append("?%s" % t)
    path = os.path.join(built, "rav4_feed.txt")
    open(path, "w").write("\n".join(feed) + "\n")
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load("RV")
dec = v.decoder
for line in open(%r):
    line = line.strip()
    if line[0] == "?":
        m.tick()
        print(line[1:], m.get("xrv.p.wheel.fl"), m.get("xrv.p.wheel.fr"), m.get("xrv.p.wheel.rl"),
              m.get("xrv.p.wheel.rr"), m.get("xrv.p.wheel.mean"), m.get("v.p.speed"), m.get("xrv.e.steer"))
        continue
    i, d = line.split("#")
    b = bytes.fromhex(d)
    dec.feed(0, int(i, 16), False, b, len(b), m.uptime())
""" % path, built)
    out = [x.split() for x in r.stdout.strip().split("\n")]
    assert len(out) >= 10
    for t, fl, fr, rl, rr, mean, speed, steer in out:
        c = checks[round(float(t), 6)]
        for got, k in ((fl, "fl"), (fr, "fr"), (rl, "rl"), (rr, "rr")):
            assert float(got) / 3.6 == pytest.approx(float(c[k]), abs=1e-9)
        want_mean = sum(float(c[k]) for k in ("fl", "fr", "rl", "rr")) / 4 * 3.6
        assert float(mean) == pytest.approx(want_mean, abs=1e-9)
        assert abs(float(speed) - want_mean) < 3        # vehicle speed vs wheel mean (km/h)


def test_rav4_odometer_in_km_and_steering(built):
    got = replay("RV", RAV4_LOG, built)
    # UI_SETTING.UNITS says miles in this car: the standard metric is converted to km
    assert got["xrv.p.odometer.unit"][0] == pytest.approx(1.609344)
    assert got["v.p.odometer"][0] == pytest.approx(got["xrv.p.odometer.disp"][0] * 1.609344)
    assert 8 <= got["v.p.speed"][0] * 1 / 3.6 <= 21      # the segment drives at 8..20 m/s
    assert got["v.e.gear"][0] == 1 and got["v.e.locked"][0] is True
    steer = [float(r["steering_angle_deg"]) for r in
             csv.DictReader(open(data(RAV4 + "/crosscheck/comma_processed_steering_angle_deg.csv")))]
    assert got["xrv.e.steer"][0] == pytest.approx(steer[-1], abs=1e-9)


def test_load_errors_and_unload(built):
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
try:
    vehicle.load("ZZ")
except ImportError as e:
    print("ImportError", e)
v = vehicle.load("KN")
n = m.count()
print(vehicle.current() is v, m.source("v.b.soc") >= 0, m.get("v.type"))
v2 = vehicle.load("RV")
print(vehicle.current() is v2, m.source("v.b.soc"), m.source("v.p.speed") >= 0, m.get("v.type"))
vehicle.unload()
print(vehicle.current(), m.source("v.p.speed"))
""", built)
    out = r.stdout.split("\n")
    assert out[0].startswith("ImportError") and "veh_zz" in out[0]
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
class Bad:
    CODE = "BD"
    TABLE = b"OVDT garbage"
vehicle.load("KN")
try:
    vehicle.load(Bad)
except ValueError as e:
    print("ValueError", e)
print(vehicle.current(), m.source("v.b.soc"), m.get("v.type"))
""", built)
    bad = r.stdout.split("\n")
    assert bad[0].startswith("ValueError") and bad[1] == "None -1 KN"
    assert out[1] == "True True KN"
    assert out[2] == "True -1 True RV"
    assert out[3] == "None -1"


# ---- commands ---------------------------------------------------------------------

def test_kona_charge_limit_frames_match_cantools(built):
    from dbc2table import load_dbc
    db = load_dbc(os.path.join(VEH, "kn", "pcan.dbc"))
    msg = db.get_message_by_name("UpdateChargeSettings")
    r = mpy("""
from ovms.can import vehicle
v = vehicle.load("KN")
print(v.commands())
for soc in (10, 50, 80, 90.5, 100):
    f = v.command_frames("charge.limit", [soc])
    print(f[0][0], f[0][1], f[0][2], f[0][3].hex())
for bad in ([], [101], [9], ["x"]):
    try:
        v.command_frames("charge.limit", bad); print("accepted")
    except ValueError as e:
        print("ValueError", e)
print(v.command_frames("lock"), v.command_frames("climatecontrol.on"))
""", built)
    out = r.stdout.strip().split("\n")
    assert out[0] == "['charge.limit']"
    for line, soc in zip(out[1:6], (10, 50, 80, 90.5, 100)):
        bus, fid, ext, data = line.split()
        want = msg.encode({"SetChargeCurrent": 0, "SetACChargeLimit": soc, "SetDCChargeLimit": soc},
                          strict=False)
        assert (bus, int(fid), ext, bytes.fromhex(data)) == ("1", msg.frame_id, "False", want)
        dec = msg.decode(bytes.fromhex(data), decode_choices=False)
        assert dec["SetACChargeLimit"] == soc and dec["SetDCChargeLimit"] == soc
    assert out[6].startswith("ValueError") and "argument" in out[6]
    assert out[7] == "ValueError charge.limit: 101 is out of range 10..100"
    assert out[8] == "ValueError charge.limit: 9 is out of range 10..100"
    assert out[9].startswith("ValueError") and "not a number" in out[9]
    assert out[10] == "None None"


def test_rav4_has_no_commands(built):
    r = mpy("""
from ovms.can import vehicle
v = vehicle.load("RV")
print(v.commands(), v.command_frames("lock"), v.command_frames("charge.start"))
""", built)
    assert r.stdout.strip() == "[] None None"


# ---- the host tool --------------------------------------------------------------

def _vdir(tmp_path, mapping, dbc="pcan.dbc", src=os.path.join(VEH, "kn", "pcan.dbc")):
    d = tmp_path / "v"
    d.mkdir(exist_ok=True)
    (d / dbc).write_text(open(src, encoding="utf-8", errors="replace").read())
    m = {"vehicle": "TX", "name": "Test", "buses": {"can0": dbc}, "metrics": {}}
    m.update(mapping)
    (d / "vehicle.json").write_text(json.dumps(m))
    return str(d)


@pytest.mark.parametrize("mapping,msg", [
    ({"metrics": {"foo.bar": {"message": "BMS_542", "signal": "SocDisp"}}}, 'vehicle metrics are named "xtx.*"'),
    ({"metrics": {"v.b.soc": {"message": "NOPE", "signal": "SocDisp"}}}, "unknown message"),
    ({"metrics": {"v.b.soc": {"message": "BMS_542", "signal": "NOPE"}}}, "unknown signal"),
    ({"metrics": {"v.e.gear": {"message": "VCU_200", "signal": "CURRENT_GEAR", "map": {"Q": 1}}}},
     "neither a number nor a VAL_ label"),
    ({"metrics": {"v.e.gear": {"message": "VCU_200", "signal": "CURRENT_GEAR", "map": {"P": "x"}}}},
     "does not fit"),
    ({"metrics": {"v.b.soc": {"message": "BMS_542", "signal": "SocDisp", "type": "i"}}}, "standard"),
    ({"metrics": {"v.b.soc": {"message": "BMS_542", "signal": "SocDisp", "colour": 1}}}, "unknown key"),
    ({"metrics": {"v.b.soc": {"message": "BMS_542", "signal": "SocDisp", "valid": [5]}}}, '"valid"'),
    ({"vehicle": "kona"}, "upper-case"),
    ({"derived": {"v.b.power": {"sum": ["v.b.nope"]}}}, "unknown input"),
    ({"derived": {"v.b.power": {"avg": ["v.b.soc"]}}}, "exactly one"),
    ({"commands": {"lock": [{"message": "NOPE"}]}}, "unknown message"),
    ({"commands": {"lock": [{"message": "UpdateChargeSettings", "signals": {"Nope": 1}}]}}, "unknown signal"),
    ({"commands": {"lock": [{"id": "0x7ff", "data": "zz"}]}}, "hex"),
    ({"commands": {"lock": [{"id": 4096, "data": "00"}]}}, "bad id"),
    ({"commands": {"lock": []}}, "non-empty"),
])
def test_build_errors_name_the_problem(tmp_path, mapping, msg):
    d = _vdir(tmp_path, mapping)
    with pytest.raises(CompileError) as e:
        vehicles.compile_vehicle(d)
    assert msg in str(e.value)


def test_raw_command_frames_and_cli(tmp_path, built):
    d = _vdir(tmp_path, {"metrics": {"v.b.soc": {"message": "BMS_542", "signal": "SocDisp"},
                                     "xtx.gear": {"message": "VCU_200", "signal": "CURRENT_GEAR"}},
                         "commands": {"lock": [{"id": "0x7A0", "data": "0211", "bus": "can0"},
                                               {"id": 1953, "ext": True, "data": ""}]}})
    v = vehicles.compile_vehicle(d)
    assert v["commands"]["lock"] == ((0, 0x7A0, 0, b"\x02\x11", ()), (0, 1953, 1, b"", ()))
    assert v["metrics"][1][:4] == ("xtx.gear", None, None, None)   # the device infers: string
    import subprocess
    import sys
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "vehicles.py"), "build", d, "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load("TX")
print(v.command_frames("lock", ["1234"]), m.typecode("xtx.gear"))
""", str(out))
    assert r.stdout.strip() == "[(1, 1952, False, b'\\x02\\x11'), (1, 1953, True, b'')] s"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "vehicles.py"), "check",
                        str(tmp_path / "nonexistent")], capture_output=True, text=True)
    assert r.returncode == 2 and "error" in r.stderr


def test_catalogue_dbc_vehicle_builds(tmp_path, built):
    # any DBC from the catalogue works the same way (here: Nissan Leaf 2018 doors and gear)
    leaf = data("dbc_catalog/opendbc-0.3.1/nissan_leaf_2018_generated.dbc")
    d = _vdir(tmp_path, {"metrics": {
        "v.d.fl": {"message": "DOORS_LIGHTS", "signal": "DOOR_OPEN_FL"},
        "v.d.fr": {"message": "DOORS_LIGHTS", "signal": "DOOR_OPEN_FR"},
        "xtx.p.wheel.fl": {"message": "WHEEL_SPEEDS_FRONT", "signal": "WHEEL_SPEED_FL"}}},
        dbc="leaf.dbc", src=leaf)
    out = str(tmp_path / "out")
    vehicles.build(d, out)
    from dbc2table import load_dbc
    db = load_dbc(leaf)
    doors = db.get_message_by_name("DOORS_LIGHTS")
    wheels = db.get_message_by_name("WHEEL_SPEEDS_FRONT")
    f1 = doors.encode({s.name: 0 for s in doors.signals} | {"DOOR_OPEN_FL": 1}, strict=False)
    f2 = wheels.encode({"WHEEL_SPEED_FR": 10, "WHEEL_SPEED_FL": 42.5}, strict=False)
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load("TX")
for fid, data in ((%d, %r), (%d, %r)):
    v.decoder.feed(0, fid, False, data, len(data), m.uptime())
print(m.text("v.d.fl"), m.text("v.d.fr"), m.text("xtx.p.wheel.fl"), m.unit("xtx.p.wheel.fl"))
""" % (doors.frame_id, bytes(f1), wheels.frame_id, bytes(f2)), out)
    assert r.stdout.strip() == "yes no 42.5 km/h"


def test_footprint_300_metrics(tmp_path, built):
    """Metric table + decoder + vehicle table for a 300-metric vehicle in a 100K heap.

    Target <= 16 KB with the decode table frozen in flash (the device build); the table
    bytes themselves are reported too (they are on the heap when loaded from a file)."""
    from dbc2table import load_dbc
    kn = json.load(open(os.path.join(VEH, "kn", "vehicle.json")))
    std = vehicles.standard_metrics()
    db = load_dbc(os.path.join(VEH, "kn", "pcan.dbc"))
    metrics = {k: v for k, v in kn["metrics"].items() if k in std}
    used = {(v["message"], v["signal"]) for v in metrics.values()}
    extra = 300 - len(std)
    for msg in db.messages:
        for s in msg.signals:
            if len(metrics) - len([k for k in metrics if k in std]) >= extra:
                break
            if (msg.name, s.name) not in used and msg.length <= 8:
                metrics["xtx.%s.%s" % (msg.name.lower(), s.name.lower())[:60]] = \
                    {"message": msg.name, "signal": s.name}
    d = _vdir(tmp_path, {"metrics": metrics})
    out = str(tmp_path / "out")
    os.remove(vehicles.build(d, out, mpy=True))
    r = mpy("""
import gc
from ovms import metrics as m
import ovms; metrics_tab = ovms.load("metrics.tab"); metrics_io = ovms.load("metrics.io")
from ovms.can import decoder
from ovms.can import vehicle
def mem():
    gc.collect()
    return gc.mem_alloc()
metrics_tab.drop()
a = mem()
m._init()
b = mem()
v = vehicle.load("TX")
c = mem()
print(m.count(), v.decoder.nsignals, b - a, c - b, c - a, len(v.decoder._t), gc.mem_free())
""", out, heap="100K")
    count, nsig, table, veh, total, tbytes, free = [int(x) for x in r.stdout.split()]
    print("300-metric vehicle: %d metrics, %d signals: standard table %d B, vehicle %d B "
          "(decode table %d B), total %d B, without the table %d B, heap free %d B"
          % (count, nsig, table, veh, tbytes, total, total - tbytes, free))
    assert count == 300
    assert total - tbytes <= 16 * 1024
