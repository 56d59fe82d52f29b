"""vehicle.json "poll" section: compiled by tools/vehicles.py into POLL of the vehicle module;
errors name the entry; the device Vehicle exposes the list and the poller accepts it."""
import json
import os

import pytest

from util import REPO, compiled_lib, run_mpy

import vehicles
from dbc2table import CompileError

VEH = os.path.join(REPO, "firmware", "vehicles")

POLL = [
    {"tx": "7E4", "request": "220101", "interval": {"awake": 60, "on": 10, "charging": 10},
     "values": {"v.b.soc": {"bytes": [4, 1], "scale": 0.5},
                "v.b.current": {"bytes": [10, 2], "signed": True, "scale": 0.1},
                "xtx.b.fan": {"bit": [13, 7]},
                "xtx.b.le": {"bytes": [0, 2], "order": "little", "add": -40}}},
    {"bus": "can1", "tx": "18DB33F1", "request": "0100", "interval": 60},
    {"tx": "0x7DF", "request": "010d", "pid": 13, "values": {"v.p.speed": {"bytes": [0, 1]}}},
]


def _vdir(tmp_path, poll):
    d = tmp_path / "v"
    d.mkdir(exist_ok=True)
    (d / "pcan.dbc").write_text(open(os.path.join(VEH, "kn", "pcan.dbc"), encoding="utf-8",
                                     errors="replace").read())
    m = {"vehicle": "TX", "name": "Test", "buses": {"can0": "pcan.dbc"},
         "metrics": {},
         "poll": poll}
    (d / "vehicle.json").write_text(json.dumps(m))
    return str(d)


def test_poll_section_compiles(tmp_path):
    v = vehicles.compile_vehicle(_vdir(tmp_path, POLL))
    assert v["poll"] == (
        (0, 0x7E4, 0x7EC, 0, b"\x22\x01\x01", (0, 60, 10, 10), -1,
         (("v.b.soc", 4, 1, 0, 0, 0.5, 0), ("v.b.current", 10, 2, 1, 0, 0.1, 0),
          ("xtx.b.fan", 13, 1, 4, 7, 1, 0), ("xtx.b.le", 0, 2, 2, 0, 1, -40))),
        (1, 0x18DB33F1, 0, 3, b"\x01\x00", (0, 60, 60, 60), -1, ()),
        (0, 0x7DF, 0, 0, b"\x01\x0d", (0, 10, 10, 10), 13, (("v.p.speed", 0, 1, 0, 0, 1, 0),)))
    assert v["buses"] == {"can0": 500000, "can1": 500000}
    out = tmp_path / "out"
    os.remove(vehicles.build(_vdir(tmp_path, POLL), str(out), mpy=True))   # bytecode, as on a module
    r = run_mpy("""
from ovms.can import vehicle, bus as canbus
from ovms.poll import poller
from ovms import config
v = vehicle.load("TX")
print(len(v.poll), v.poll[2][1])
p = poller.Poller(v.poll, {0: canbus.CanBus("can0", 0, can=object()), 1: canbus.CanBus("can1", 1, can=object())})
print(len(p.ecus), p.ecus[0])
""", path=(str(out), compiled_lib()), heap="200K")   # .mpy code sits in the heap here
    assert r.stdout.split() == ["3", "2015", "3", "(0,", "2020,", "2028)"], r.stdout


@pytest.mark.parametrize("entry,msg", [
    ({"tx": "7E4"}, '"request" must be 1..64 bytes'),
    ({"tx": "7E4", "request": "xyz"}, '"request" must be hex bytes'),
    ({"tx": "zz", "request": "01"}, "tx must be a hex id"),
    ({"tx": "7E4", "request": "01", "bus": "can9"}, "bad bus"),
    ({"tx": "7E4", "request": "01", "interval": {"sleep": 1}}, '"interval" must be'),
    ({"tx": "7E4", "request": "01", "values": {"foo.bar": {"bytes": [0, 1]}}}, "vehicle metrics are named"),
    ({"tx": "7E4", "request": "01", "values": {"v.b.soc": {"bytes": [0, 5]}}}, '"bytes" must be'),
    ({"tx": "7E4", "request": "01", "values": {"v.b.soc": {"bit": [0, 8]}}}, '"bit" must be'),
    ({"tx": "7E4", "request": "01", "values": {"v.b.soc": {"bytes": [0, 1], "order": "mixed"}}}, '"order"'),
    ({"tx": "7E4", "request": "01", "oops": 1}, "unknown key(s) oops"),
])
def test_poll_section_errors(tmp_path, entry, msg):
    with pytest.raises(CompileError) as e:
        vehicles.compile_vehicle(_vdir(tmp_path, [entry]))
    assert msg in str(e.value) and "poll[0]" in str(e.value)
