"""Resident heap of config + metrics + decoder + vehicle + CAN task, with lib/ frozen as on the
board (ROMFS image, qstrs pre-interned: tools/memprof.py), and the on-demand helper modules."""
import glob
import os
import struct
import subprocess

import memprof
import vdev

from util import MICROPYTHON, data, run_mpy

RAV4_LOG = data("toyota_rav4_comma2k19/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log")

# The CAN -> metrics stack as the app runs it: import, config, restored metrics, the RAV4
# definition, one bus on a machine.CAN stand-in replaying real frames, the 1 Hz housekeeping.
SCENARIO = r"""
import asyncio
with open(%(frames)r, "rb") as f:
    FR = f.read()
NFR = len(FR) // 13
class FakeIRQ:
    def flags(self):
        return 0
class FakeCAN:
    FLAG_EXT_ID = 2
    FLAG_RTR = 1
    RECV_ERR_OVERRUN = 2
    FILTERS_MAX = 4
    def __init__(self):
        self.pos = 0
        buf = memoryview(bytearray(8))     # its own frame buffer: views of 0..8 bytes
        self.views = [buf[:k] for k in range(9)]
        self.irqobj = FakeIRQ()
        self.h = None
    def init(self, bitrate, mode=0):
        pass
    def set_filters(self, f):
        pass
    def irq(self, handler=None, trigger=0, hard=False):
        if handler is not None:
            self.h = handler
        return self.irqobj
    def recv(self, lst):
        p = self.pos
        if p >= NFR * 13:
            return None
        n = FR[p + 4]
        v = self.views[8]
        for j in range(n):
            v[j] = FR[p + 5 + j]
        lst[0] = FR[p] | (FR[p + 1] << 8) | (FR[p + 2] << 16)
        lst[1] = self.views[n]
        lst[2] = 0
        lst[3] = 0
        self.pos = p + 13
        return lst
    def state(self):
        return 1
    def get_counters(self, lst=None):
        return lst
can = FakeCAN()
_f = asyncio.ThreadSafeFlag()       # (asyncio's event module: not part of the budget)
m("before")
from ovms import config, metrics
from ovms.can import decoder
from ovms.can import vehicle, bus as canbus
m("imported")
config.init(%(store)r)
metrics.load(%(store)r + "/metrics.sav")
v = vehicle.load("RV")
canbus.start(v, cans={0: can})
async def drive():
    can.pos = 0
    while can.pos < NFR * 13:
        can.h(can)
        await asyncio.sleep_ms(5)
async def main():
    asyncio.create_task(metrics.run(%(store)r + "/metrics.sav", 2))
    await asyncio.sleep_ms(10)
    await drive()
    await asyncio.sleep_ms(1100)
    m("running")
    for k in range(2):
        await drive()
        await asyncio.sleep_ms(2100)
    m("steady")
    print("RESULT", canbus.buses()[0].frames, canbus.buses()[0].decoded, metrics.get("v.p.speed"))
    import sys
    print("HELPERS", sorted(k for k in sys.modules if k.startswith("ovms.")))
asyncio.run(main())
"""


def _frames(path, n=600):
    out = bytearray()
    for line in open(RAV4_LOG):
        p = line.split()
        if len(p) < 3:
            continue
        fid, _, data = p[2].partition("#")
        data = bytes.fromhex(data)
        out += struct.pack("<IB", int(fid, 16), len(data)) + data.ljust(8, b"\0")
        n -= 1
        if not n:
            break
    with open(path, "wb") as f:
        f.write(out)


def test_resident_heap_of_can_metrics_stack(tmp_path):
    frames = str(tmp_path / "frames.bin")
    _frames(frames)
    store = str(tmp_path / "store")
    os.mkdir(store)
    rom = vdev.build_rom(str(tmp_path))
    vdev.calibrate_heap(vdev.heap_bytes("400K"), rom)
    script = str(tmp_path / "prof.py")
    with open(script, "w") as f:
        f.write(memprof.PRELUDE % {"rom": rom, "qstrs": rom + ".qstrs"}
                + SCENARIO % {"frames": frames, "store": store})
    r = subprocess.run([MICROPYTHON, "-X", "heapsize=400K", script], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    live = {}
    for line in r.stdout.splitlines():
        p = line.split()
        if len(p) == 3 and p[1].isdigit():
            live[p[0]] = int(p[1])
    res = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0].split()
    assert int(res[1]) == 3 * 600 and int(res[2]) > 100 and float(res[3]) > 0
    # rarely used code is not kept: only the modules that run all the time stay loaded
    assert "metrics.tab" not in r.stdout and "config.schema" not in r.stdout \
        and "can.filters" not in r.stdout and "config.recover" not in r.stdout, r.stdout
    used = live["steady"] - live["before"]
    print("resident heap of the CAN->metrics stack: %d B (imports %d B)"
          % (used, live["imported"] - live["before"]))
    # 64-bit host (about twice the ESP32's object sizes): 36 KB before the RAM work, ~25 KB now
    assert used <= 27 * 1024, r.stdout
    assert live["steady"] - live["running"] <= 128, r.stdout     # no growth while running


def test_rare_api_is_loaded_on_demand_and_dropped(tmp_path):
    # helpers come back on use (metrics: until the next tick; config, canbus: for the call)
    r = run_mpy("""
import sys
from ovms import metrics as m, config
from ovms.can import bus as canbus
def loaded():
    return sorted(k[5:] for k in sys.modules if k in ("ovms.metrics.tab", "ovms.metrics.io",
                  "ovms.config.schema", "ovms.can.filters", "ovms.config.recover"))
m.tick()
print(loaded())
i = m.define("xq.speed", "f", "km/h")
print(loaded(), m.unit(i), m.T_VINT, m.TYPES, m.UNITS[10], m.stale_timeout(i))
m.tick()
m.set("v.b.c.voltage", [3.5, 3.25])
t = m.text("v.b.c.voltage")
print(loaded(), t)
m.tick()
print(loaded())
try:
    m.no_such_function
except AttributeError:
    print("AttributeError")
m.tick()
config.init(%r)
config.set("vehicle", "id", "X1")
print(loaded(), config.get("vehicle", "id"), config.describe("vehicle", "id"), hasattr(config, "nope"))
print(canbus.cover([0x100, 0x200], 4), loaded())
""" % str(tmp_path), heap="200K")     # (compiled from source here: frozen on the device)
    out = r.stdout.strip().split("\n")
    assert out[0] == "[]"
    assert out[1] == "['metrics.tab'] km/h 5 fibsvwDT km/h 0"
    assert out[2] == "['metrics.io'] 3.5,3.25"
    assert out[3] == "[]"
    assert out[4] == "AttributeError"
    assert out[5] == "[] X1 text, max 32 chars (default '') False"
    assert out[6] == "[(256, 2047), (512, 2047)] []"


def test_defining_metrics_interns_no_letters():
    # qstrs are never freed: defining vehicle metrics must not intern their letters
    r = run_mpy("""
import micropython
from ovms import metrics as m
def names(k):
    # names built at run time from bytes (literals would be interned by the compiler)
    return bytes((0x78, 0x71, 0x2e, 0x5a - k, 0x51 + k % 5, 0x4a, 0x2e, 0x30 + k // 10,
                  0x30 + k % 10)).decode()
m.define(names(0))
micropython.qstr_info()
for k in range(1, 20):
    m.define(names(k), "i", "kWh")
print(m.find(names(7)) >= 0, m.name(m.find(names(3))) == names(3))
micropython.qstr_info()
""")
    lines = r.stdout.strip().split("\n")
    counts = [int(x.split("n_qstr=")[1].split(",")[0]) for x in lines if "n_qstr=" in x]
    assert lines[1] == "True True"
    assert counts[0] == counts[1], r.stdout


def test_on_demand_modules_carry_no_native_code():
    # native/viper code loaded with a module is never freed (ESP32: executable IRAM until the
    # next soft reset; unix: an mmap record on the heap), so the modules that are dropped and
    # loaded again at run time must be bytecode only; the hot viper code lives in modules
    # that stay loaded
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
    native = sorted(os.path.relpath(p, lib) for p in glob.glob(os.path.join(lib, "**", "*.py"),
                                                               recursive=True)
                    if "@micropython.viper" in open(p).read()
                    or "@micropython.native" in open(p).read())
    assert native == ["ovms/can/decoder.py", "ovms/metrics/__init__.py"]


def test_metric_requests_do_not_grow_the_heap():
    # what `request/metric` does on every call: a pattern match (rare API, loaded on demand)
    # and the 1 Hz tick that drops the helper again, many times over
    r = run_mpy("""
import gc
from ovms import metrics as m
def cycle():
    n = sum(1 for _ in m.match("m.net"))
    m.tick()
    return n
for _ in range(5):
    cycle()
gc.collect()
a = gc.mem_alloc()
for _ in range(200):
    n = cycle()
gc.collect()
print(n > 0, gc.mem_alloc() - a)
""", heap="200K")
    ok, grew = r.stdout.split()
    assert ok == "True" and int(grew) <= 256, r.stdout
