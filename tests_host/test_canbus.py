"""ovms.can.bus: IRQ-driven drain into the decoder, filters, listen-only, bus-off recovery, counters."""
import os

import pytest

from util import compiled_lib, run_mpy
from test_vehicle import KONA_LOG, VEH, vehicles

# A machine.CAN stand-in with the documented semantics: a 16-slot RX ring that counts
# overruns (and flags the next frame RECV_ERR_OVERRUN), recv(list) filling the caller's
# list in place without allocating, software id/mask filters, state()/restart(),
# get_counters(list), irq(handler, trigger, hard) and send().
FAKE = r"""
import micropython
class FakeIRQ:
    def __init__(self):
        self.pending = 0
    def flags(self):
        f = self.pending
        self.pending = 0
        return f

class FakeCAN:
    MODE_NORMAL = 0
    MODE_SLEEP = 1
    MODE_LOOPBACK = 2
    MODE_SILENT = 3
    MODE_SILENT_LOOPBACK = 4
    STATE_STOPPED = 0
    STATE_ACTIVE = 1
    STATE_WARNING = 2
    STATE_PASSIVE = 3
    STATE_BUS_OFF = 4
    FLAG_RTR = 1
    FLAG_EXT_ID = 2
    FLAG_UNORDERED = 4
    RECV_ERR_FULL = 1
    RECV_ERR_OVERRUN = 2
    IRQ_RX = 1
    IRQ_TX = 2
    IRQ_STATE = 4
    FILTERS_MAX = 4
    RING = 16
    def __init__(self):
        self.ids = [0] * 16
        self.flags = [0] * 16
        self.lens = [0] * 16
        self.data = bytearray(16 * 8)
        self.head = self.count = 0
        self.overruns = 0
        self.lost = 0
        self.sent = []
        self.filters = "unset"
        self.mode = None
        self.st = self.STATE_ACTIVE
        self.tec = self.rec = 0
        self.restarts = 0
        self.handler = None
        self.irqobj = FakeIRQ()
        self.views = None
    def init(self, bitrate, mode=0):
        self.bitrate = bitrate
        self.mode = mode
    def set_filters(self, f):
        if f is not None and len(f) > self.FILTERS_MAX:
            raise ValueError("too many filters")
        self.filters = f
    def irq(self, handler=None, trigger=0, hard=False):
        if handler is not None or trigger:
            self.handler = handler
            self.trigger = trigger
        return self.irqobj
    def accepts(self, fid, ext):
        if self.filters is None:
            return True
        for i, m, fl in self.filters:
            if bool(fl & self.FLAG_EXT_ID) == bool(ext) and (fid & m) == (i & m):
                return True
        return False
    def inject(self, fid, data, ext=False, irq=True):
        # what the ISR does: filter, store in the ring or count an overrun
        if not self.accepts(fid, ext):
            return False
        if self.count == self.RING:
            self.overruns += 1
            self.lost += 1
            return False
        s = (self.head + self.count) % self.RING
        self.ids[s] = fid
        self.flags[s] = self.FLAG_EXT_ID if ext else 0
        self.lens[s] = len(data)
        self.data[s * 8:s * 8 + len(data)] = data
        self.count += 1
        if irq and self.handler:
            self.irqobj.pending |= self.IRQ_RX
            self.handler(self)
        return True
    def recv(self, lst):
        if not self.count:
            return None
        if self.views is None:             # (no comprehension: lst would become a cell)
            base = lst[1]
            self.views = []
            for k in range(9):
                self.views.append(base[:k])
        s = self.head
        n = self.lens[s]
        v = self.views[8]
        o = s * 8
        for j in range(n):
            v[j] = self.data[o + j]
        lst[0] = self.ids[s]
        lst[1] = self.views[n]
        lst[2] = self.flags[s]
        lst[3] = self.RECV_ERR_OVERRUN if self.lost else 0
        self.lost = 0
        self.head = (s + 1) % self.RING
        self.count -= 1
        return lst
    def state(self):
        return self.st
    def restart(self):
        self.restarts += 1
        self.st = self.STATE_ACTIVE
        self.tec = 0
    def get_counters(self, lst=None):
        c = [self.tec, self.rec, 0, 0, 1 if self.st == self.STATE_BUS_OFF else 0, 0,
             self.count, self.overruns]
        if lst is None:
            return c
        for i in range(8):
            lst[i] = c[i]
        return lst
    def send(self, fid, data, flags=0):
        if self.st == self.STATE_BUS_OFF:
            raise OSError(5)
        if len(self.sent) >= 8:
            return None
        self.sent.append((fid, bytes(data), flags))
        return len(self.sent) - 1

def load_frames(path, bus="can0", limit=None):
    n = 0
    for line in open(path):
        p = line.split()
        if p[1] != bus:
            continue
        i, d = p[2].split("#")
        yield int(i, 16), bytes.fromhex(d), len(i) > 3
        n += 1
        if limit and n >= limit:
            break
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("can"))
    for d in vehicles.vehicle_dirs(VEH):
        os.remove(vehicles.build(d, out, mpy=True))
    return out


def mpy(code, built, **kw):
    return run_mpy(FAKE + code, path=(compiled_lib(), built), **kw)


def test_cover_filters():
    r = run_mpy("""
from ovms.can.bus import cover
def ok(ids, f, ext=False):
    full = 0x1FFFFFFF if ext else 0x7FF
    acc = sum(1 for x in range(0x800) if any((x & m) == (i & m) for i, m in f)) if not ext else None
    return all(any((x & m) == (i & m) for i, m in f) for x in ids), acc
print(cover([0x100, 0x200], 4))
print(cover([], 4))
ids = [0x109, 0x10C, 0x153, 0x200, 0x201, 0x202, 0x220, 0x291, 0x2B0, 0x386, 0x541, 0x542, 0x595, 0x5D0]
f = cover(ids, 4)
print(len(f), ok(ids, f))
f = cover(ids, 1)
print(len(f), ok(ids, f))
e = [0x18FF0001, 0x18FF0002, 0x18DAF110, 0x0CF00400, 0x18FEF100]
f = cover(e, 2, True)
print(len(f), ok(e, f, True)[0])
print(cover([0x7FF, 0x7FF, 0x7FF], 4))
""", path=(compiled_lib(),))
    out = r.stdout.strip().split("\n")
    assert out[0] == "[(256, 2047), (512, 2047)]"
    assert out[1] == "[]"
    n, (good, acc) = out[2].split(" ", 1)[0], eval(out[2].split(" ", 1)[1])
    assert n == "4" and good and acc < 0x800 // 4      # far fewer than all ids
    assert out[3].startswith("1 (True")
    assert out[4] == "2 True"
    assert out[5] == "[(2047, 2047)]"


def test_drain_decodes_without_allocating(built):
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle, bus as canbus
v = vehicle.load("KN")
can = FakeCAN()
bus = canbus.CanBus("can0", 0, v.bitrate(0), v.decoder, v.ids(0), True, can)
bus.open()
print(can.mode == can.MODE_SILENT, can.bitrate, len(can.filters) <= 4)
n = fed = rejected = 0
for fid, data, ext in load_frames(%r, limit=6000):
    if can.inject(fid, data, ext, irq=False):
        fed += 1
    else:
        rejected += 1
    if fed == 1:
        n += bus.drain(16)          # the fake CAN sets up its views on the first recv
    elif can.count == 16:
        now = m.uptime()
        micropython.heap_lock()
        n += bus.drain(16, now)
        micropython.heap_unlock()
micropython.heap_lock()
n += bus.drain(16, m.uptime())
micropython.heap_unlock()
known = set(i for i, e in v.ids(0))
print(n == fed == bus.frames, bus.decoded == sum(1 for fid, d, e in load_frames(%r, limit=6000)
                                                  if fid in known), rejected, can.overruns)
print(m.get("v.b.soc"), m.get("v.b.voltage"), m.get("v.p.odometer"))
""" % (KONA_LOG, KONA_LOG), built)
    out = r.stdout.strip().split("\n")
    assert out[0] == "True 500000 True"
    ok, dec, rejected, ovr = out[1].split()
    assert ok == "True" and dec == "True" and ovr == "0"
    assert out[2] == "36.5 355.1 26716.5"


def test_task_drains_on_irq_and_publishes_counters(built):
    r = mpy("""
import asyncio
from ovms import metrics as m
from ovms.can import vehicle, bus as canbus
v = vehicle.load("KN")
can = FakeCAN()
async def producer():
    k = 0
    for fid, data, ext in load_frames(%r, limit=9000):
        can.inject(fid, data, ext)
        k += 1
        if k & 7 == 0:                   # bursts of 8, then let the CAN task run
            await asyncio.sleep_ms(0)
async def main():
    buses = canbus.start(v, cans={0: can})
    b = buses[0]
    await producer()
    await asyncio.sleep_ms(1200)
    print(b.frames, can.overruns, m.get("m.can0.frames"), m.get("m.can0.decoded"),
          m.get("m.can0.overruns"), m.get("m.can0.busstate"), m.get("m.can0.fps") >= 0)
    print(m.get("v.b.soc"), m.get("v.b.voltage"))
    st = dict(canbus.status())
    print(st["can0 mode"], st["can0 state"], st["can0 frames"] == b.frames)
    canbus.stop()
asyncio.run(main())
""" % KONA_LOG, built)
    out = r.stdout.strip().split("\n")
    frames, ovr, mframes, decoded, movr, state, fps = out[0].split()
    assert ovr == "0" and movr == "0" and state == "active" and fps == "True"
    assert int(frames) == int(mframes) > int(decoded) > 1000       # filters cover a few more ids
    assert out[1] == "36.5 355.1"
    assert out[2] == "listen-only active True"


def test_overruns_are_counted(built):
    r = mpy("""
from ovms import metrics as m
from ovms.can import bus as canbus
can = FakeCAN()
bus = canbus.CanBus("can0", 0, 500000, None, None, True, can)
bus.open()
print(can.filters)
for k in range(20):
    can.inject(0x100 + k, b"\\x01\\x02", irq=False)
print(bus.drain(100), can.overruns)
can.inject(0x200, b"", irq=False)
print(bus.drain(100), bus.rx_overrun, bus.rx_errors)
import time
bus._fps_t = time.ticks_add(time.ticks_ms(), -1000)      # as if the last count was 1 s ago
bus.publish()
print(m.get("m.can0.overruns"), m.get("m.can0.frames"), m.get("m.can0.errors"), m.get("m.can0.fps"))
""", built)
    out = r.stdout.strip().split("\n")
    assert out[0] == "None"                  # no vehicle: receive everything
    assert out[1] == "16 4"
    assert out[2] == "1 1 1"                 # one received frame carried the overrun flag
    o, f, e, fps = out[3].split()
    assert (o, f, e) == ("4", "17", "1") and 15 < float(fps) <= 17


def test_overrun_flag_on_next_frame(built):
    r = mpy("""
from ovms import metrics as m
from ovms.can import bus as canbus
can = FakeCAN()
bus = canbus.CanBus("can0", 0, 500000, None, None, True, can)
bus.open()
for k in range(17):
    can.inject(0x100, b"", irq=False)
bus.drain(1)                                  # frees one slot; the lost frame flags the next
can.inject(0x101, b"", irq=False)
print(bus.drain(100), bus.rx_overrun, bus.rx_errors)
""", built)
    assert r.stdout.strip() == "16 1 1"


def test_bus_off_restart_with_backoff(built):
    r = mpy("""
import time
from ovms import metrics as m
from ovms.can import bus as canbus
can = FakeCAN()
bus = canbus.CanBus("can0", 0, 500000, None, None, True, can)
bus.backoff_min = 50
bus.open()
can.st = can.STATE_BUS_OFF
print(bus.check(), can.restarts)
time.sleep_ms(60)
print(bus.check(), can.restarts)                  # restarted after 50 ms
can.st = can.STATE_BUS_OFF                        # still failing: next wait doubles
print(bus.check(), can.restarts)
time.sleep_ms(60)
print(bus.check(), can.restarts)                  # 60 < 100 ms: not yet
time.sleep_ms(50)
print(bus.check(), can.restarts, bus._backoff)
bus.publish()
print(m.get("m.can0.busoff"), m.get("m.can0.restarts"), m.get("m.can0.busstate"))
""", built)
    out = [x for x in r.stdout.strip().split("\n") if not x.startswith("canbus:")]
    assert out[0] == "bus-off 0"
    assert out[1] == "bus-off 1"
    assert out[2] == "active 1" or out[2].startswith("bus-off")
    assert out[3] == "bus-off 1"
    assert out[4].startswith("bus-off 2 200") or out[4].startswith("active 2")
    assert out[5].split()[:2] == ["1", "2"]


def test_listen_only_blocks_transmit_normal_mode_sends(built):
    r = mpy("""
from ovms.can import bus as canbus, vehicle
v = vehicle.load("KN")
a = FakeCAN()
canbus._buses.append(canbus.CanBus("can0", 0, 500000, v.decoder, v.ids(0), True, a).open())
print(a.mode == a.MODE_SILENT, canbus.send(1, 0x562, False, b"\\x00" * 8), a.sent)
canbus.stop()
a = None
import gc; gc.collect()
b = FakeCAN()
canbus._buses.append(canbus.CanBus("can0", 0, 500000, v.decoder, v.ids(0), False, b).open())
f = v.command_frames("charge.limit", [80])[0]
print(b.mode == b.MODE_NORMAL, canbus.send(*f), b.sent, canbus.send(2, 0x1, False, b""))
print(canbus.send(1, 0x18FF0001, True, b"\\x01"), b.sent[-1])
b.st = b.STATE_BUS_OFF
print(canbus.send(1, 0x100, False, b""))
""", built, heap="160K")  # two buses' worth of objects on a 64-bit host
    out = r.stdout.strip().split("\n")
    assert out[0] == "True False []"
    assert out[1] == "True True [(1378, b'\\x00\\x00\\x00\\x00\\xa0\\xa0\\x00\\x00', 0)] False"
    assert out[2] == "True (419364865, b'\\x01', 2)"
    assert out[3] == "False"


def test_filters_follow_vehicle_ids(built):
    r = mpy("""
from ovms.can import bus as canbus, vehicle
v = vehicle.load("RV")
can = FakeCAN()
bus = canbus.CanBus("can0", 0, 500000, v.decoder, v.ids(0), True, can).open()
ids = [i for i, e in v.ids(0)]
print(len(ids) > 4, len(can.filters) <= 4, all(can.accepts(i, False) for i in ids))
bus = None
can.FILTERS_MAX = 32
bus = canbus.CanBus("can0", 0, 500000, v.decoder, v.ids(0), True, can).open()
print(sorted(i for i, m, f in can.filters) == sorted(ids), all(m == 0x7FF for i, m, f in can.filters))
bus = None
class Picky(FakeCAN):
    def set_filters(self, f):
        if f is not None:
            raise ValueError("no filters here")
        self.filters = f
p = Picky()
canbus.CanBus("can0", 0, 500000, v.decoder, v.ids(0), True, p).open()
print(p.filters)
""", built)
    out = r.stdout.strip().split("\n")
    assert out[0] == "True True True"
    assert out[1] == "True True"
    assert out[-1] == "None"


def test_garbage_frames_do_not_crash(built):
    r = mpy("""
from ovms import metrics as m
from ovms.can import vehicle, bus as canbus
v = vehicle.load("KN")
can = FakeCAN()
bus = canbus.CanBus("can0", 0, 500000, v.decoder, None, True, can).open()
import random
for k in range(400):
    fid = random.getrandbits(11)
    data = bytes(random.getrandbits(8) for _ in range(random.getrandbits(4) % 9))
    can.inject(fid, data, irq=False)
    can.inject(0x542, b"\\x49", irq=False)          # short BMS_542 frame
    can.inject(0x542, b"", irq=False)
    bus.drain(16)
print(bus.frames, m.get("v.b.soc"))
""", built)
    n, soc = r.stdout.split()
    assert int(n) == 1200 and soc == "36.5"


def test_virtual_device_replay_end_to_end(tmp_path, built):
    """The CAN task on the virtual device's machine.CAN: a paced replay of the Kona log
    (the bus waits for the firmware) decodes into metrics with no overrun."""
    import shutil
    import time
    from util import VDev
    root = tmp_path / "flash"
    shutil.copytree(compiled_lib(), root / "lib")
    shutil.copy(os.path.join(built, "veh_kn.mpy"), root / "lib" / "veh_kn.mpy")
    (root / "boot.py").write_text("")
    (root / "main.py").write_text("""
import asyncio
from ovms import metrics as m
from ovms.can import vehicle, bus as canbus
v = vehicle.load('KN')
async def watch():
    last, same = -1, 0
    while True:
        await asyncio.sleep_ms(500)
        n = canbus.buses()[0].frames
        same = same + 1 if n == last and n > 0 else 0
        last = n
        if same == 4:           # the replay is over (the bus waits for the firmware)
            print('RESULT', m.get('v.b.soc'), m.get('v.b.voltage'), m.get('v.p.odometer'),
                  m.get('m.can0.overruns'), m.get('m.can0.busstate'),
                  m.get('m.can0.frames') > 10000, m.get('m.can0.decoded') > 5000)
async def main():
    canbus.start(v, listen_only=True)
    asyncio.create_task(watch())
    await m.run()
asyncio.run(main())
""")
    log = os.path.join(VEH, "kn", "logs", "230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz")
    # heap (ESP32 bytes, scaled by vdev): the memory budget itself is
    # test_vehicle.test_footprint_300_metrics
    for attempt in range(2):
        with VDev(root, can_log=log, speed=0, heap="80K", extra=("--once",)) as d:
            t0 = time.time()
            while time.time() < t0 + 60 and "RESULT" not in d.console():
                if time.time() > t0 + 20 and not d.console().strip():
                    break       # silent for 20 s: the device did not boot
                time.sleep(0.5)
            con = d.console()
        if con.strip():
            break
        # a device that never printed anything did not boot (a virtual device hiccup seen
        # under heavy host load); one retry, anything else is a real failure
    out = con[con.index("RESULT"):].split("\n")[0].split()[1:] if "RESULT" in con else con
    assert out == ["36.5", "355.1", "26716.5", "0", "active", "True", "True"], con
