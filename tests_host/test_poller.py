"""Diagnostic poller on the virtual device against an independent ISO-TP peer (can-isotp over
python-can's socketcand interface): multi-frame answers, block size, STmin, lost frames, silent
ECUs, NRCs (0x78 pending), wrong lengths, the 4095-byte limit, two buses, sleep, generic OBD-II."""
import threading
import time

import pytest

from util import VDev

can = pytest.importorskip("can")
isotp = pytest.importorskip("isotp")

DEV = """
import asyncio, time
from ovms import metrics
from ovms.can import bus as canbus
from ovms.poll import poller
ENTRIES = %(entries)s
OPTS = %(opts)s
async def main():
    bs = canbus.start(None, listen_only=False, hw=(1, 2), extra={0: [], 1: []})
    metrics.set("v.e.on", %(on)s)
    metrics.set("v.e.awake", False)         # (the REPL keeps modules between tests)
    metrics.set("v.c.charging", False)
    metrics.set("v.b.12v.voltage", 12.6)
    co = poller.start((ENTRIES, None, OPTS), bs)
    asyncio.create_task(co)
    p = poller.current()
    async def ask(bus, tx, rx, req, ext=False):
        ok, r = await p.request(bus, tx, rx, ext, bytes.fromhex(req))
        print("R", "ok" if ok else "err", r.hex() if ok else r)
%(body)s
    for ln in p.status():
        print("S", ln)
    p.stop()
    canbus.stop()
    await asyncio.sleep_ms(50)
asyncio.run(main())
print("END")
"""


def run_dev(d, body, entries=(), opts=None, on=True, timeout=120):
    code = DEV % dict(entries=repr(tuple(entries)), opts=repr(opts or {}), on=on,
                      body="\n".join("    " + ln for ln in body.strip().splitlines()))
    out = d.exec(code, timeout=timeout).replace("\r", "")
    assert "END" in out, out
    return out


def results(out):
    return [ln[2:] for ln in out.splitlines() if ln.startswith("R ")]


def status(out):
    return [ln[2:] for ln in out.splitlines() if ln.startswith("S ")]


class Ecu:
    """An ECU simulator: can-isotp stack on the device's bus; handler(request) -> [(delay s,
    answer bytes)]."""

    def __init__(self, d, rxid, txid, handler, channel="can0", ext=False, **params):
        self.bus = d.can_bus(channel)
        self.notifier = can.Notifier(self.bus, [])
        mode = isotp.AddressingMode.Normal_29bits if ext else isotp.AddressingMode.Normal_11bits
        p = dict(stmin=0, blocksize=0, tx_padding=0xAA, rx_flowcontrol_timeout=2000,
                 rx_consecutive_frame_timeout=2000, max_frame_size=8192)
        p.update(params)
        self.stack = isotp.NotifierBasedCanStack(self.bus, self.notifier,
                                                 address=isotp.Address(mode, rxid=rxid, txid=txid),
                                                 params=p)
        self.handler = handler
        self.requests = []
        self.times = []
        self.run = True
        self.stack.start()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while self.run:
            req = self.stack.recv(block=True, timeout=0.1)
            if req is None:
                continue
            self.requests.append(bytes(req))
            self.times.append(time.time())
            for delay, ans in self.handler(bytes(req)):
                time.sleep(delay)
                self.stack.send(ans)

    def close(self):
        self.run = False
        self.t.join(2)
        self.stack.stop()
        self.notifier.stop()
        self.bus.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class Watch:
    """Records every frame on a channel with its host timestamp."""

    def __init__(self, d, channel="can0"):
        self.bus = d.can_bus(channel)
        self.frames = []
        self.notifier = can.Notifier(self.bus, [self.frames.append])

    def close(self):
        self.notifier.stop()
        self.bus.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def ids(self, fid):
        return [m for m in self.frames if m.arbitration_id == fid]


def payload(n, seed=0):
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def uds(req, n=40):
    # positive answer to a 22 DID request: 62 DID data...
    return [(0, bytes([req[0] + 0x40]) + req[1:3] + payload(n - 3))]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    with VDev(tmp_path_factory.mktemp("poll") / "dev") as d:
        d.mpremote("exec", "import time; time.sleep_ms(10)")    # app stopped: the tests drive
        yield d


def test_multi_frame_with_flow_control_and_block_size(dev):
    with Ecu(dev, 0x7E4, 0x7EC, lambda r: uds(r, 200)) as ecu, Watch(dev) as w:
        out = run_dev(dev, 'await ask(0, 0x7e4, 0x7ec, "220101")', opts=dict(bs=4, stmin=0))
    r = results(out)
    assert r == ["ok " + (b"\x62\x01\x01" + payload(197)).hex()], out
    assert ecu.requests == [b"\x22\x01\x01"]
    fcs = w.ids(0x7E4)[1:]                  # after the request: flow controls, one per 4 CFs
    cfs = [m for m in w.ids(0x7EC) if m.data[0] >> 4 == 2]
    assert len(cfs) == (200 - 6 + 6) // 7
    assert len(fcs) == 1 + (len(cfs) - 1) // 4
    assert all(m.data[0] == 0x30 and m.data[1] == 4 for m in fcs)
    assert all(len(m.data) == 8 and m.data[3:] == b"\xaa" * 5 for m in fcs)   # padded


def test_device_stmin_honoured_by_ecu(dev):
    with Ecu(dev, 0x7E4, 0x7EC, lambda r: uds(r, 60)), Watch(dev) as w:
        out = run_dev(dev, 'await ask(0, 0x7e4, 0x7ec, "220102")', opts=dict(stmin=30))
    assert results(out)[0].startswith("ok 620102")
    fc = [m for m in w.ids(0x7E4) if m.data[0] >> 4 == 3]
    assert len(fc) == 1 and fc[0].data[2] == 30          # the device asks for 30 ms
    t = [m.timestamp for m in w.ids(0x7EC) if m.data[0] >> 4 == 2]
    assert len(t) == 8
    # (host timestamps of the ECU's frames: TCP delivery adds jitter to single gaps)
    assert (t[-1] - t[0]) / 7 >= 0.028, t


def test_long_request_honours_ecu_block_size_and_stmin(dev):
    req = "2e0101" + payload(37).hex()           # 40 bytes: FF + 5 CFs
    with Ecu(dev, 0x7E4, 0x7EC, lambda r: [(0, b"\x6e\x01\x01")], blocksize=2, stmin=25) as ecu, \
            Watch(dev) as w:
        out = run_dev(dev, 'await ask(0, 0x7e4, 0x7ec, "%s")' % req)
    assert results(out) == ["ok 6e0101"], out
    assert ecu.requests == [bytes.fromhex(req)]
    cfs = [m for m in w.ids(0x7E4) if m.data[0] >> 4 == 2]
    fcs = [m for m in w.ids(0x7EC) if m.data[0] >> 4 == 3]
    assert len(cfs) == 5 and len(fcs) == 3               # a flow control every 2 CFs
    within = [cfs[1].timestamp - cfs[0].timestamp, cfs[3].timestamp - cfs[2].timestamp]
    assert min(within) >= 0.02, within


def test_lost_consecutive_frame_wrong_lengths_and_sequence(dev):
    """Raw frames (not can-isotp): a CF missing, a CF never coming, an SF longer than its frame."""
    bus = dev.can_bus("can0")
    stop = threading.Event()

    def ecu():
        n = 0
        while not stop.is_set():
            m = bus.recv(0.1)
            if m is None or m.arbitration_id != 0x7E4 or m.data[0] >> 4 != 0:
                continue
            n += 1
            send = lambda data: bus.send(can.Message(arbitration_id=0x7EC, data=data, is_extended_id=False))
            if n == 1:        # FF 20 bytes, then CF 1, CF 3 (CF 2 lost)
                send(b"\x10\x14\x62\x01\x01\x00\x00\x00")
                time.sleep(0.05)
                send(b"\x21\x01\x02\x03\x04\x05\x06\x07")
                send(b"\x23\x01\x02\x03\x04\x05\x06\x07")
            elif n == 2:      # FF, CF 1, then nothing: N_Cr
                send(b"\x10\x14\x62\x01\x01\x00\x00\x00")
                time.sleep(0.05)
                send(b"\x21\x01\x02\x03\x04\x05\x06\x07")
            elif n == 3:      # SF claims 7 bytes in a 4-byte frame
                send(b"\x07\x62\x01\x01")
            elif n == 4:      # last CF shorter than the bytes left
                send(b"\x10\x0a\x62\x01\x01\x00\x00\x00")
                time.sleep(0.05)
                send(b"\x21\x01\x02")
            else:
                send(b"\x04\x62\x01\x01\x09")
    t = threading.Thread(target=ecu, daemon=True)
    t.start()
    try:
        out = run_dev(dev, "\n".join(['await ask(0, 0x7e4, 0x7ec, "220101")'] * 5))
    finally:
        stop.set()
        t.join(2)
        bus.shutdown()
    assert results(out) == ["err wrong sequence number", "err consecutive frame lost",
                            "err wrong length", "err wrong length", "ok 62010109"], out


def test_silent_ecu_backed_off_and_nrcs(dev):
    def h(r):
        if r == b"\x22\x01\x05":      # pending twice (past P2), then the answer
            return [(0, b"\x7f\x22\x78"), (0.8, b"\x7f\x22\x78"), (0.8, b"\x62\x01\x05\x2a")]
        if r == b"\x22\x01\x06":
            return [(0, b"\x7f\x22\x31")]
        return uds(r, 5)
    entries = [(0, 0x7E5, 0x7ED, 0, b"\x22\x01\x01", (1, 1, 1, 1), -1, ()),      # nobody there
               (0, 0x7E4, 0x7EC, 0, b"\x22\x01\x06", (1, 1, 1, 1), -1, ())]
    with Ecu(dev, 0x7E4, 0x7EC, h):
        out = run_dev(dev, """
await ask(0, 0x7e4, 0x7ec, "220105")
await asyncio.sleep_ms(6000)
""", entries=entries, opts=dict(timeout=300))
    assert results(out)[0] == "ok 6201052a", out
    st = status(out)
    silent = [ln for ln in st if ln.startswith("can0 7e5")][0].split()
    assert int(silent[4]) >= 3                       # timeouts
    assert silent[-1] != "-"                         # backed off
    assert int(silent[3]) == 0
    nrc = [ln for ln in st if ln.startswith("can0 7e4")][0].split()
    assert int(nrc[5]) >= 3 and int(nrc[3]) == 0     # negative responses counted, no answers
    assert "negative response 31" in out


def test_answer_length_limits(dev):
    def h(r):
        return [(0, b"\x62\x01\x01" + payload(int.from_bytes(r[3:5], "big") - 3))]
    with Ecu(dev, 0x7E4, 0x7EC, h):
        out = run_dev(dev, """
await ask(0, 0x7e4, 0x7ec, "2201010fff")
await ask(0, 0x7e4, 0x7ec, "2201011000")
""", opts=dict(bs=8, size=4095))
        r = results(out)
        assert r[0] == "ok " + (b"\x62\x01\x01" + payload(4092)).hex()
        assert r[1] == "err answer too long"
        out = run_dev(dev, """
await ask(0, 0x7e4, 0x7ec, "22010103e8")
await ask(0, 0x7e4, 0x7ec, "22010103e9")
await ask(0, 0x7e4, 0x7ec, "2201010005")
""", opts=dict(size=1000, bs=8))
    r = results(out)
    assert r[0].startswith("ok 620101") and len(r[0]) == 3 + 2000
    assert r[1:] == ["err answer too long", "ok 620101" + payload(2).hex()]
    assert "answers too long 1 (limit 1000)" in out


def test_two_buses_at_once_and_metrics(dev):
    entries = [(0, 0x7E4, 0x7EC, 0, b"\x22\x01\x01", (1, 1, 1, 1), -1,
                (("xtst.a", 0, 2, 0, 0, 0.5, -10), ("xtst.b", 2, 1, 1, 0, 1, 0),
                 ("xtst.c", 3, 1, 4, 3, 1, 0))),
               (1, 0x18DA10F1, 0x18DAF110, 1, b"\x22\x02\x02", (1, 1, 1, 1), -1,
                (("xtst.d", 0, 4, 0, 0, 1, 0),))]
    a = lambda r: [(0.3, b"\x62\x01\x01\x01\x2c\xfe\x08" + payload(20))]
    b = lambda r: [(0.3, b"\x62\x02\x02\x00\x01\x00\x02")]
    with Ecu(dev, 0x7E4, 0x7EC, a) as e1, \
            Ecu(dev, 0x18DA10F1, 0x18DAF110, b, channel="can1", ext=True) as e2:
        out = run_dev(dev, """
await asyncio.sleep_ms(3500)
print("M", metrics.get("xtst.a"), metrics.get("xtst.b"), metrics.get("xtst.c"), metrics.get("xtst.d"))
""", entries=entries)
    m = [ln for ln in out.splitlines() if ln.startswith("M ")][0].split()
    assert m[1:] == ["140.0", "-2.0", "True", "65538.0"], out
    assert len(e1.requests) >= 3 and len(e2.requests) >= 3
    # both in flight at once: each request on can1 comes while one on can0 waits its 0.3 s
    assert any(abs(a - b) < 0.25 for a in e1.times for b in e2.times), (e1.times, e2.times)


def test_polling_stops_while_asleep(dev):
    entries = [(0, 0x7E4, 0x7EC, 0, b"\x22\x01\x01", (1, 1, 1, 1), -1, ())]
    bus = dev.can_bus("can0")
    talk = threading.Event()
    talk.set()
    stop = threading.Event()

    def talker():                       # the car's own traffic while it is awake
        while not stop.is_set():
            if talk.is_set():
                bus.send(can.Message(arbitration_id=0x100, data=b"\x01", is_extended_id=False))
            time.sleep(0.1)
    t = threading.Thread(target=talker, daemon=True)
    t.start()
    try:
        with Ecu(dev, 0x7E4, 0x7EC, lambda r: uds(r, 5)) as ecu:
            threading.Timer(5.0, talk.clear).start()
            out = run_dev(dev, """
await asyncio.sleep_ms(3500)
print("A", p.state, p.requests)
await asyncio.sleep_ms(4500)
n = p.requests
print("B", p.state)
await asyncio.sleep_ms(3000)
print("C", p.state, p.requests - n)
""", entries=entries, opts=dict(sleep=2), on=False)
    finally:
        stop.set()
        t.join(2)
        bus.shutdown()
    lines = {ln[0]: ln.split()[1:] for ln in out.splitlines() if ln[:2] in ("A ", "B ", "C ")}
    assert lines["A"][0] == "0" and int(lines["A"][1]) >= 3          # off, bus awake: polled
    assert lines["B"][0] == "-1" and lines["C"] == ["-1", "0"], out   # asleep: nothing sent
    assert len(ecu.requests) >= 3


def test_generic_obd_discovery_polls_only_supported(dev):
    sup = {0x00: bytes.fromhex("18188000"), 0x20: bytes.fromhex("00000000")}
    # supported: 04 05 0C 0D 11 (0x18 = 04,05; 0x18 = 0C,0D; 0x80 = 11); 0x20 not supported
    vals = {0x04: b"\x80", 0x05: b"\x5a", 0x0C: b"\x1a\xf8", 0x0D: b"\x32", 0x11: b"\x33"}

    def h(r):
        if r[0] != 1:
            return []
        if r[1] in sup:
            return [(0, bytes([0x41, r[1]]) + sup[r[1]])]
        if r[1] in vals:
            return [(0, bytes([0x41, r[1]]) + vals[r[1]])]
        return []
    with Ecu(dev, 0x7DF, 0x7E8, h) as ecu:
        out = run_dev(dev, """
from ovms.poll import obd
p.stop()
await asyncio.sleep_ms(50)
asyncio.create_task(poller.start((obd.POLL, None, {}), bs))
p = poller.current()
await asyncio.sleep_ms(3000)
print("M", metrics.get("v.p.speed"), metrics.get("v.m.rpm"), metrics.get("xobd.e.coolant.temp"), metrics.get("v.e.throttle"))
""")
    m = [ln for ln in out.splitlines() if ln.startswith("M ")][0].split()
    assert m[1:] == ["50.0", "1726", "50.0", "20.0"], out
    asked = {r[1] for r in ecu.requests}
    assert asked == {0x00, 0x04, 0x05, 0x0C, 0x0D, 0x11}, sorted(asked)


APP = """
import asyncio, gc
from ovms import app, config, shell
app._setup()
config.set("vehicle", "poll", "obd")
async def main():
    from ovms import metrics
    metrics.set("v.e.awake", True)
    app._start_vehicle()
    await asyncio.sleep_ms(3000)
    shell.local.secure = True
    print(await shell.run_async("obd request 7df - 010d"))
    print(await shell.run_async("obd request 7e0 7e8 0902"))
    print(await shell.run_async("obd status"))
    gc.collect()
    print("FREE", gc.mem_free())
    for n, t in app._tasks:
        t.cancel()
    from ovms.poll import poller
    poller.stop()
asyncio.run(main())
config.set("vehicle", "poll", "auto")
print("END")
"""


def test_app_generic_obd_one_config_value_and_shell(dev):
    def h(r):
        if r == b"\x01\x00":
            return [(0, bytes.fromhex("4100" + "00080000"))]        # PID 0x0D only
        if r == b"\x01\x0d":
            return [(0, b"\x41\x0d\x2a")]
        return [(0, b"\x7f" + r[:1] + b"\x12")]
    with Ecu(dev, 0x7DF, 0x7E8, h), Ecu(dev, 0x7E0, 0x7E8, h):
        out = dev.exec(APP, timeout=120).replace("\r", "")
    assert "END" in out, out
    assert "410d2a" in out
    assert "Error: negative response 12 (service 09)" in out
    assert "Poller: state" in out and "can0 7df      any" in out, out
    assert "(limit 1024)" in out                      # the default answer buffer
    row = [ln for ln in out.splitlines() if ln.startswith("can0 7df")][0].split()
    assert int(row[3]) >= 2           # discovery and speed answered


def test_low_12v_pauses_polling_unless_on(dev):
    entries = [(0, 0x7E4, 0x7EC, 0, b"\x22\x01\x01", (1, 1, 1, 1), -1, ())]
    with Ecu(dev, 0x7E4, 0x7EC, lambda r: uds(r, 5)) as ecu:
        out = run_dev(dev, """
metrics.set("v.e.awake", True)
metrics.set("v.b.12v.voltage", 11.6)
await asyncio.sleep_ms(2500)
print("A", p.state, p.requests)
metrics.set("v.e.on", True)
await asyncio.sleep_ms(2500)
print("B", p.state, p.requests)
metrics.set("v.e.on", False)
metrics.set("v.e.awake", False)
""", entries=entries, opts=dict(vmin=12.0), on=False)
    lines = {ln[0]: ln.split()[1:] for ln in out.splitlines() if ln[:2] in ("A ", "B ")}
    assert lines["A"] == ["-1", "0"], out           # awake, but the 12 V battery is low
    assert lines["B"][0] == "2" and int(lines["B"][1]) >= 2
    assert len(ecu.requests) >= 2
