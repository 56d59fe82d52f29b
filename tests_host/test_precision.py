"""Display precision of metric values: decimals from the DBC resolution through the vehicle's
factor/add, overridable in vehicle.json, else OVMS's 6 significant digits; one text for MQTT,
the shell and the saved metrics; changes below the precision are not changes."""
import json
import os

import pytest

from util import REPO, compiled_lib, run_mpy

import vehicles
from dbc2table import CompileError, load_dbc

VEH = os.path.join(REPO, "firmware", "vehicles")
RV_DBC = os.path.join(VEH, "rv", "toyota_new_mc_pt_generated.dbc")


def mpy(code, *path):
    r = run_mpy(code, path=(compiled_lib(),) + path)
    return r.stdout.strip().split("\n")


# ---- where the decimals come from --------------------------------------------------

@pytest.mark.parametrize("step,add,want", [
    (0.01, 0, 2), (0.1, 0, 1), (1, 0, 0), (1, -40, 0), (0.5, -40, 1), (0.25, 0, 2),
    (0.125, 0, 3), (0.05, 0, 2), (0.1, -40.05, 2), (2, 0, 0), (-0.1, 0, 1),
    (0.01 * 0.621371, 0, 3),        # km -> miles: one raw step (0.0062 mi) stays visible
    (0.001 * 1.609344, 0, 3), (1e-12, 0, 9), (0, 0, None)])
def test_decimals_from_resolution(step, add, want):
    assert vehicles.resolution_decimals(step, add) == want


def _vdir(tmp_path, metrics, derived=None):
    d = tmp_path / "v"
    d.mkdir(exist_ok=True)
    src = os.path.join(VEH, "kn", "pcan.dbc")
    (d / "pcan.dbc").write_text(open(src, encoding="utf-8", errors="replace").read())
    m = {"vehicle": "TX", "name": "Test", "buses": {"can0": "pcan.dbc"}, "metrics": metrics}
    if derived:
        m["derived"] = derived
    (d / "vehicle.json").write_text(json.dumps(m))
    return str(d)


TX = {
    "v.b.soc": {"message": "BMS_542", "signal": "SocDisp"},                     # 0.5 %
    "xtx.b.uccs": {"message": "BMS_542", "signal": "uwe542_78_UCCS"},           # 0.1 V
    "xtx.b.uccs.kv": {"message": "BMS_542", "signal": "uwe542_78_UCCS", "factor": 0.001},
    "xtx.b.uccs.odd": {"message": "BMS_542", "signal": "uwe542_78_UCCS", "factor": 0.621371},
    "xtx.b.uccs.round": {"message": "BMS_542", "signal": "uwe542_78_UCCS", "precision": 0},
    "v.b.12v.current": {"message": "TwelveVolt_Battery_INCORRECT", "signal": "BAT_SNSR_I",
                        "factor": 2, "add": 0.005},
}


def test_vehicle_rows_carry_decimals_through_factor_add_and_override(tmp_path):
    v = vehicles.compile_vehicle(_vdir(tmp_path, TX, {"xtx.b.sum": {
        "sum": ["v.b.soc", "xtx.b.uccs"], "precision": 1}}))
    prec = {r[0]: r[8] for r in v["metrics"] if len(r) > 8}
    assert prec == {"v.b.soc": 1, "xtx.b.uccs": 1, "xtx.b.uccs.kv": 4, "xtx.b.uccs.odd": 2,
                    "xtx.b.uccs.round": 0, "v.b.12v.current": 3}
    assert v["derived"][0][7] == 1
    rv = vehicles.compile_vehicle(os.path.join(VEH, "rv"))
    rows = {r[0]: r for r in rv["metrics"]}
    assert rows["xrv.e.steer.fraction"][8] == 1          # DBC scale 0.1
    assert rows["xrv.e.steer.angle"][8] == 1             # DBC scale 1.5
    assert len(rows["xrv.p.odometer.disp"]) == 8         # int: no decimals to carry
    assert len(rows["xrv.p.odometer.unit"]) == 8         # value map: OVMS default


@pytest.mark.parametrize("bad", [-1, 10, 1.5, "2", True])
def test_bad_precision_is_a_build_error(tmp_path, bad):
    with pytest.raises(CompileError, match='"precision" must be decimals 0..9'):
        vehicles.compile_vehicle(_vdir(tmp_path, {"v.b.soc": {
            "message": "BMS_542", "signal": "SocDisp", "precision": bad}}))


# ---- the text on the device ----------------------------------------------------------

def _rv_frames():
    db = load_dbc(RV_DBC)
    steer = db.get_message_by_name("STEER_ANGLE_SENSOR")
    ui = db.get_message_by_name("UI_SETTING")
    f1 = steer.encode({"STEER_ANGLE": -12, "STEER_FRACTION": -0.7, "STEER_RATE": 0})
    f2 = ui.encode({"UNITS": 2, "ODOMETER": 15589}, strict=False)
    return (steer.frame_id, f1), (ui.frame_id, f2)


def test_the_issue_examples_read_without_binary_noise(tmp_path):
    out = str(tmp_path)
    os.remove(vehicles.build(os.path.join(VEH, "rv"), out, mpy=True))
    (i1, f1), (i2, f2) = _rv_frames()
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load("RV")
v.decoder.feed(0, %d, False, %r, 8, m.uptime())
v.decoder.feed(0, %d, False, %r, 8, m.uptime())
m.tick()
for n in ("xrv.e.steer.fraction", "xrv.e.steer.angle", "xrv.e.steer", "v.p.odometer"):
    print(n, repr(m.get(n)), m.text(n), m.precision(n))
""" % (i1, f1, i2, f2), out)
    assert r == ["xrv.e.steer.fraction -0.7000000000000001 -0.7 1",   # value kept, text clean
                 "xrv.e.steer.angle -12.0 -12 1",
                 "xrv.e.steer -12.7 -12.7 None",
                 "v.p.odometer 25088.063616000003 25088.1 None"]   # derived: OVMS 6 digits


def test_factor_override_and_default_texts_on_the_device(tmp_path):
    out = str(tmp_path / "b")
    os.mkdir(out)
    os.remove(vehicles.build(_vdir(tmp_path, TX, {"xtx.b.sum": {
        "sum": ["v.b.soc", "xtx.b.uccs.odd"], "precision": 1}}), out, mpy=True))
    db = load_dbc(os.path.join(VEH, "kn", "pcan.dbc"))
    msg = db.get_message_by_name("BMS_542")
    fr = msg.encode({s.name: 0 for s in msg.signals} | {"SocDisp": 57.5, "uwe542_78_UCCS": 367.3})
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle
v = vehicle.load("TX")
v.decoder.feed(0, %d, False, %r, 8, m.uptime())
m.tick()
for n in ("v.b.soc", "xtx.b.uccs", "xtx.b.uccs.kv", "xtx.b.uccs.odd", "xtx.b.uccs.round",
          "xtx.b.sum"):
    print(n, m.text(n))
m.precision("xtx.b.uccs", None)        # back to the OVMS default
print(m.text("xtx.b.uccs"), m.precision("xtx.b.uccs"))
i = m.define("xtx.free", "f")
for x in (123456.7, 0.1 + 0.2, 1234567.0, -0.0000001, 2.5e-7, 0.0, -0.0):
    m.set(i, x)
    print(m.text(i))
""" % (msg.frame_id, fr), out)
    assert r == ["v.b.soc 57.5", "xtx.b.uccs 367.3", "xtx.b.uccs.kv 0.3673",
                 "xtx.b.uccs.odd 228.23",          # 367.3 V x 0.621371: 2 decimals show 0.06
                 "xtx.b.uccs.round 367",
                 "xtx.b.sum 285.7",                # 57.5 + 228.228... at its 1 decimal
                 "367.3 None",
                 "123457", "0.3", "1.23457e+06", "-1e-07", "2.5e-07", "0", "0"]


# ---- changes below the precision ---------------------------------------------------------

def test_changes_below_the_precision_set_no_change_flag():
    r = mpy("""
from ovms import metrics as m
i = m.define("xtx.v", "f")
m.precision(i, 2)
print(m.set(i, 10.0), m.set(i, 10.001), m.set(i, 10.004), m.modified(i, m.MQTT))
m.clear_all(m.MQTT)
print(m.set(i, 10.004999), m.modified(i, m.MQTT), m.text(i), m.get(i))
print(m.set(i, 10.006), m.modified(i, m.MQTT), m.text(i))
m.clear_all(m.MQTT)
j = m.find("v.b.soc")                      # OVMS default: 6 significant digits
print(m.set(j, 55.12341), m.set(j, 55.123449), m.set(j, 55.12346), m.text(j))
k = m.find("v.b.c.voltage")
print(m.set(k, [3.9100001, 3.92]), m.set(k, [3.91, 3.92]), m.set(k, [3.91, 3.921]))
""")
    assert r == ["True False False True",
                 "False False 10 10.004999",     # 10.00 (shown "10") still: no change
                 "True True 10.01",
                 "True False True 55.1235",
                 "True False True"]


SCHED = r'''
from ovms import metrics
import time
T = [time.ticks_ms()]
metrics._ms = lambda: T[0] & 0x3FFFFFFF
metrics._up_last = metrics._ms()
from ovms.v3.sched import Scheduler
s = Scheduler((5, 10, 10, 60, 600))
def step(ms=6000):
    T[0] += ms
    s.collect()
    out = s.due(metrics.uptime())
    for i in out:
        s.sent(i, metrics.uptime())
    return [metrics.text(i) for i in out]
metrics.set("v.e.on", True)
i = metrics.define("xtx.v", "f")
metrics.configure(i, deadband=1e-9)         # every change that shows
metrics.precision(i, 1)
metrics.set(i, 20.0)
s.all()
step()
s.sent(i, metrics.uptime())
# raw values as a decoder reports them: stored and flagged without a text comparison
for v in (20.01, 20.04, 20.049, 20.06, 20.07, 20.1, 20.12, 19.96):
    metrics._store(i, 0, v)
    metrics.mark(i)
    print(v, step())
'''


def test_changes_below_the_precision_are_not_published():
    r = mpy(SCHED)
    assert r == ["20.01 []", "20.04 []", "20.049 []", "20.06 ['20.1']", "20.07 []",
                 "20.1 []", "20.12 []", "19.96 ['20']"]


# ---- one text everywhere -----------------------------------------------------------------

def test_same_text_in_shell_mqtt_payload_and_after_save_load(tmp_path):
    path = str(tmp_path / "m.txt")
    r = mpy("""
from ovms import metrics as m, shell
import ovms.shell.metrics
m.set("v.p.odometer", 25088.063616000003)
m.set("v.p.latitude", 51.0000004)
i = m.define("xtx.f", "f", "", 0, True)
m.precision(i, 1)
m.set(i, -0.7000000000000001)
for n in ("v.p.odometer", "v.p.latitude", "xtx.f"):
    print(repr(m.text(n)), repr(shell.run("metrics get " + n)))
m.save(%r)
m.init()
i = m.define("xtx.f", "f", "", 0, True)
m.precision(i, 1)
m.load(%r)
for n in ("v.p.odometer", "v.p.latitude", "xtx.f"):
    print(repr(m.text(n)), m.get(n))
print(open(%r).read().count("25088.1"))
""" % (path, path, path))
    assert r[:3] == ["'25088.1' '25088.1km'", "'51' '51'", "'-0.7' '-0.7'"]
    assert r[3:] == ["'25088.1' 25088.1", "'51' 51.0", "'-0.7' -0.7", "1"]
