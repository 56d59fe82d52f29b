"""CAN task: IRQ-driven zero-allocation receive into the decoder, filters, bus-off recovery, counters."""
import array
import asyncio
import time
from micropython import const
from ovms import metrics

_BATCH = const(32)          # frames drained before yielding to other tasks
_BACKOFF_MIN = const(1000)  # ms before the first restart after bus-off
_BACKOFF_MAX = const(60000)
_HEALTHY = const(60)        # s without bus-off before the backoff resets

_STATES = ("stopped", "active", "warning", "passive", "bus-off")
_STATE_NAMES = ("STATE_STOPPED", "STATE_ACTIVE", "STATE_WARNING", "STATE_PASSIVE", "STATE_BUS_OFF")

# m.<bus>.* counter metrics: name suffixes in the order of CanBus._m
_M_NAMES = "frames fps overruns errors tec rec busstate busoff restarts decoded"
_M_FRAMES = const(0)
_M_FPS = const(1)
_M_OVERRUNS = const(2)
_M_ERRORS = const(3)
_M_TEC = const(4)
_M_REC = const(5)
_M_BUSSTATE = const(6)
_M_BUSOFF = const(7)
_M_RESTARTS = const(8)
_M_DECODED = const(9)

_buses = []


# bus.cover and the filter helpers live in can.filters (used when a bus opens): imported
# for the call and dropped again
_attrs = {"*": "can.filters"}


def __getattr__(a):
    import ovms
    return ovms.attr(_attrs, a, True)


class CanBus:
    """One CAN controller feeding the vehicle decoder.

    name: "can0".. (metric prefix m.<name>.*); index: decoder bus index (can0 = 0);
    can: a machine.CAN-compatible object (None: machine.CAN(hw, ...)); ids: [(id, ext)]
    to accept (None: all); listen_only: CAN.MODE_SILENT (no ACKs, no transmit)."""

    def __init__(self, name="can0", index=0, bitrate=500000, decoder=None, ids=None,
                 listen_only=True, can=None, hw=1):
        self.name = name
        self.index = index
        self.bitrate = bitrate
        self.decoder = decoder
        self.listen_only = listen_only
        self._ids = ids         # until open() has turned them into filters
        self._can = can
        self._hw = hw
        self._rx = [0, memoryview(bytearray(8)), 0, 0]
        self._cnt = [0] * 8     # get_counters() buffer
        self._acc = array.array("i", bytes(64))   # [0:8] counts lost by restarts, [8:16] last seen
        self.backoff_min = _BACKOFF_MIN     # ms; doubles per failed restart up to _BACKOFF_MAX
        self._flag = None
        self._irq = None
        self._running = False
        self.frames = 0         # received since start
        self.decoded = 0        # frames of ids the decoder knows
        self.rx_errors = 0      # frames flagged with a receive error (FIFO full / overrun)
        self.rx_overrun = 0     # frames flagged RECV_ERR_OVERRUN (frames were lost before)
        self.busoff = 0
        self.restarts = 0
        self.filters = None
        self.tap = None         # tap(id, ext, data) -> True: the frame was taken (diagnostic poller)
        self._boff_at = 0       # ticks_ms when bus-off was seen, 0 = not in bus-off
        self._backoff = 0       # ms to wait before the next restart (0: backoff_min)
        self._healthy_since = 0
        self._fps_frames = 0
        self._fps_t = 0
        self._m = m = array.array("H", bytes(20))     # metric index per _M_*
        k = 0
        for nm in _M_NAMES.split():
            m[k] = metrics.define("m.%s.%s" % (name, nm),
                                  "f" if k == _M_FPS else "s" if k == _M_BUSSTATE else "i")
            if k == _M_FRAMES or k == _M_FPS or k == _M_DECODED:
                metrics.configure(m[k], min_interval=60)   # diagnostics: at most once a minute
            k += 1

    # ---- controller ------------------------------------------------------------
    def open(self):
        """Initialise the controller, filters and the RX interrupt."""
        can = self._can
        if can is None:
            from machine import CAN
            mode = CAN.MODE_SILENT if self.listen_only else CAN.MODE_NORMAL
            can = self._can = CAN(self._hw, self.bitrate, mode=mode)
        else:
            mode = getattr(can, "MODE_SILENT" if self.listen_only else "MODE_NORMAL", 0)
            can.init(self.bitrate, mode=mode)
        if self._ids is not None:       # once: a second open() reuses the filters
            self.filters = __getattr__("filters")(self._ids, getattr(can, "FILTERS_MAX", 4),
                                                  getattr(can, "FLAG_EXT_ID", 1 << 29))
            self._ids = None
        try:
            can.set_filters(self.filters)
        except (ValueError, OSError) as e:      # controller refuses: receive everything
            print("canbus: %s: filters not accepted (%s), receiving all" % (self.name, e))
            self.filters = None
            can.set_filters(None)
        self._flag = asyncio.ThreadSafeFlag()
        trig = getattr(can, "IRQ_RX", 1) | getattr(can, "IRQ_STATE", 4)
        self._irq = can.irq(self._on_irq, trig, False)
        self._fps_t = time.ticks_ms()
        return self

    def _on_irq(self, can):
        irq = self._irq
        if irq is not None:
            irq.flags()
        if self._flag is not None:
            self._flag.set()

    # ---- receive path (no allocation per frame) ----------------------------------
    def drain(self, limit=_BATCH, now=0):
        """Receive and decode up to `limit` queued frames; returns how many."""
        can = self._can
        rx = self._rx
        dec = self.decoder
        bus = self.index
        fext = getattr(can, "FLAG_EXT_ID", 1 << 29)
        frtr = getattr(can, "FLAG_RTR", 1 << 30)
        fovr = getattr(can, "RECV_ERR_OVERRUN", 2)
        tap = self.tap
        if not now:
            now = metrics.uptime()
        n = 0
        while n < limit:
            if can.recv(rx) is None:
                break
            n += 1
            e = rx[3]
            if e:
                self.rx_errors += 1
                if e & fovr:
                    self.rx_overrun += 1
            f = rx[2]
            if tap is not None and tap(rx[0], f & fext, rx[1]):
                continue
            if dec is not None and not f & frtr:
                d = rx[1]
                if dec.feed(bus, rx[0], f & fext, d, len(d), now) or dec.message >= 0:
                    self.decoded += 1
        self.frames += n
        return n

    async def _rx_task(self):
        flag = self._flag
        while self._running:
            await flag.wait()
            while self._running and self.drain() == _BATCH:
                await asyncio.sleep_ms(0)

    # ---- health ------------------------------------------------------------------
    def state(self):
        """Controller state name: stopped, active, warning, passive or bus-off."""
        try:
            s = self._can.state()
        except (AttributeError, OSError):
            return "stopped"
        for k in range(5):
            if s == getattr(self._can, _STATE_NAMES[k], k):
                return _STATES[k]
        return "unknown"

    def counters(self):
        """Controller counters accumulated across restarts: [TEC, REC, warning, passive,
        bus-off, tx pending, rx pending, rx overruns] (None where not supported)."""
        try:
            c = self._can.get_counters(self._cnt)
        except (AttributeError, OSError, TypeError):
            return [None] * 8
        out = [None] * 8
        acc = self._acc
        for k in range(8):
            v = c[k] if c else None
            if v is not None and k >= 2 and k != 5 and k != 6:      # event counts: survive restarts
                if v < acc[8 + k]:
                    acc[k] += acc[8 + k]
                acc[8 + k] = v
                v += acc[k]
            out[k] = v
        return out

    def check(self):
        """Bus-off recovery with exponential backoff; call about once a second."""
        st = self.state()
        t = time.ticks_ms()
        if st == "bus-off":
            if not self._boff_at:
                self._boff_at = t or 1
                self.busoff += 1
                self._healthy_since = 0
                print("canbus: %s: bus-off, restart in %d ms" % (self.name, self._backoff or self.backoff_min))
            elif time.ticks_diff(t, self._boff_at) >= (self._backoff or self.backoff_min):
                self.restarts += 1
                try:
                    self._can.restart()
                except OSError as e:
                    print("canbus: %s: restart failed: %s" % (self.name, e))
                self._boff_at = t or 1
                self._backoff = min((self._backoff or self.backoff_min) * 2, _BACKOFF_MAX)
        else:
            if self._boff_at:
                self._boff_at = 0
                self._healthy_since = t
            if self._healthy_since and time.ticks_diff(t, self._healthy_since) > _HEALTHY * 1000:
                self._backoff = 0
                self._healthy_since = 0
        return st

    def publish(self):
        """Counters as metrics m.<name>.* (frames, fps, overruns, errors, tec, rec,
        busstate, busoff, restarts, decoded)."""
        st = self.check()
        c = self.counters()
        t = time.ticks_ms()
        dt = time.ticks_diff(t, self._fps_t)
        m = self._m
        if dt >= 500:
            metrics.set(m[_M_FPS], (self.frames - self._fps_frames) * 1000 / dt)
            self._fps_frames = self.frames
            self._fps_t = t
        metrics.set(m[_M_FRAMES], self.frames)
        metrics.set(m[_M_DECODED], self.decoded)
        metrics.set(m[_M_OVERRUNS], max(c[7] or 0, self.rx_overrun))
        metrics.set(m[_M_ERRORS], (c[2] or 0) + (c[3] or 0) + (c[4] or 0) + self.rx_errors)
        metrics.set(m[_M_TEC], c[0] or 0)
        metrics.set(m[_M_REC], c[1] or 0)
        metrics.set(m[_M_BUSSTATE], st)
        metrics.set(m[_M_BUSOFF], self.busoff)
        metrics.set(m[_M_RESTARTS], self.restarts)

    def status(self):
        """[(label, value)] for `can status`."""
        c = self.counters()
        p = self.name + " "
        return [(p + "state", self.state()), (p + "mode", "listen-only" if self.listen_only else "normal"),
                (p + "bitrate", self.bitrate), (p + "frames", self.frames),
                (p + "decoded", self.decoded), (p + "overruns", max(c[7] or 0, self.rx_overrun)),
                (p + "rx errors", self.rx_errors), (p + "tec", c[0]), (p + "rec", c[1]),
                (p + "bus-off", self.busoff), (p + "restarts", self.restarts),
                (p + "filters", __getattr__("text")(self.filters))]

    # ---- transmit ----------------------------------------------------------------
    def send(self, fid, data, ext=False):
        """Queue one frame; False if listen-only, the queue is full or the bus is off."""
        if self.listen_only or self._can is None:
            return False
        try:
            r = self._can.send(fid, data, getattr(self._can, "FLAG_EXT_ID", 1 << 29) if ext else 0)
        except OSError:
            return False
        return r is not None

    # ---- task ----------------------------------------------------------------------
    async def run(self):
        """Open the controller and run: RX drain task plus 1 Hz health/counters."""
        if self._flag is None:
            self.open()
        self._running = True
        rx = asyncio.create_task(self._rx_task())
        try:
            while self._running:
                try:
                    self.publish()
                except Exception as e:      # never let a counter problem stop the bus
                    print("canbus: %s: %r" % (self.name, e))
                await asyncio.sleep_ms(1000)
        finally:
            self._running = False
            rx.cancel()

    def stop(self):
        self._running = False
        if self._flag is not None:
            self._flag.set()
        try:
            self._can.irq(None)
        except Exception:
            pass


def start(vehicle=None, listen_only=True, cans=None, hw=(1,), bitrate=None, extra=None):
    """Create one CanBus per vehicle bus (or can0 when no vehicle) and start their tasks.

    listen_only: config "vehicle can.mode" != "normal"; bitrate: override (config
    "vehicle can.bitrate"), default the vehicle's; cans: {bus index: machine.CAN-like
    object} instead of machine.CAN(hw[n]); extra: {bus index: [(id, ext)]} received too
    (diagnostic answers). Returns the CanBus list (kept for send/status)."""
    stop()
    idx = []
    if vehicle is not None:
        for b in vehicle.buses:
            idx.append(int(b[3:]))
    for i in extra or ():
        if i not in idx:
            idx.append(i)
    if not idx:
        idx = [0]
    idx.sort()
    for n, i in enumerate(idx):
        if cans is None and n >= len(hw):
            print("canbus: no controller for can%d (vehicle bus ignored)" % i)
            continue
        b = CanBus("can%d" % i, i, bitrate or (vehicle.bitrate(i) if vehicle else 500000),
                   vehicle.decoder if vehicle else None,
                   _ids(vehicle, i, extra), listen_only,
                   cans.get(i) if cans else None, hw[n] if n < len(hw) else n + 1)
        b.open()
        asyncio.create_task(b.run())
        _buses.append(b)
    return list(_buses)


def _ids(vehicle, i, extra):
    # None: receive everything. A bus the vehicle decodes nothing on (a poll-only vehicle,
    # e.g. an imported profile) receives all too: its traffic is how the poller knows the
    # car is awake
    ids = vehicle.ids(i) if vehicle is not None and "can%d" % i in vehicle.buses else None
    if not ids:
        return None
    if extra and i in extra:
        ids = list(ids) + list(extra[i])
    return ids


def stop():
    while _buses:
        _buses.pop().stop()


def buses():
    return list(_buses)


def send(bus, fid, ext, data):
    """can_send hook: bus 1..4 (OVMS numbering: bus 1 = "can0"); False on failure."""
    for b in _buses:
        if b.index == bus - 1:
            return b.send(fid, data, ext)
    return False


def status():
    """can_status hook: [(label, value)] of every bus."""
    if not _buses:
        return "CAN bus not started"
    out = []
    for b in _buses:
        out.extend(b.status())
    return out
