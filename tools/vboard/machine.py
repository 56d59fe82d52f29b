"""Virtual ESP32 `machine` module: CAN (TWAI), WDT, Timer, reset, unique_id, RTC, Pin."""
import _thread
import os
import time

import micropython

import _hw

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset():
    """Hard reset: the host restarts the process (files kept)."""
    _hw.ctl(b"RESET")
    while True:
        time.sleep_ms(1000)


def soft_reset():
    _hw.ctl(b"SOFT")
    while True:
        time.sleep_ms(1000)


def deepsleep(ms=0):
    _hw.ctl(b"DEEPSLEEP %d" % ms)
    while True:
        time.sleep_ms(1000)


def lightsleep(ms=0):
    time.sleep_ms(ms)


def reset_cause():
    return int(os.getenv("VDEV_CAUSE") or PWRON_RESET)


def unique_id():
    return bytes.fromhex(os.getenv("VDEV_UID") or "240ac4000001")


def freq(hz=None):
    return 240000000


def idle():
    time.sleep_ms(1)


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class WDT:
    """Hardware watchdog: the host resets the device when not fed in time; cannot be stopped."""

    def __init__(self, id=0, timeout=5000):
        _hw.ctl(b"WDT %d" % timeout)

    def feed(self):
        _hw.ctl(b"FEED")


class Timer:
    """Soft timer: a thread schedules the callback like an ESP32 timer interrupt."""
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kw):
        self._gen = 0
        if kw:
            self.init(**kw)

    def init(self, mode=PERIODIC, period=-1, callback=None, freq=None):
        if freq:
            period = 1000 // freq
        self._gen += 1
        self._cb = callback
        _thread.start_new_thread(self._run, (self._gen, mode, max(1, period)))

    def _run(self, gen, mode, period):
        while gen == self._gen:
            time.sleep_ms(period)
            if gen != self._gen:
                break
            try:
                micropython.schedule(self._cb, self)
            except RuntimeError:
                pass  # schedule queue full: tick lost, like an overloaded board
            if mode == Timer.ONE_SHOT:
                break

    def deinit(self):
        self._gen += 1


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        if dt is not None:
            return None  # the host clock is authoritative
        t = time.gmtime()
        return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)

    def init(self, dt=None):
        pass


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self._v = value or 0

    def init(self, *a, **k):
        pass

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def irq(self, handler=None, trigger=3):
        return None


def _views(mv):
    # (a separate function: a comprehension inside recv() would make its locals closure cells,
    # which allocate on every call)
    return (mv, [mv[:i] for i in range(9)])


class UART:
    """machine.UART with a GPS receiver on it: tools/vdev.py plays the NMEA log of
    --gps-log at the configured baud rate (10 bits a byte) from the moment the UART opens,
    looped; without a log the receiver is silent. A 1 KB receive ring (rxbuf) drops what
    overflows it, as the driver's does. Writes are accepted and dropped."""

    def __init__(self, id, baudrate=9600, **kw):
        self._id = id
        self._sock = None
        self.init(baudrate, **kw)

    def init(self, baudrate=9600, rxbuf=1024, **kw):
        self.deinit()
        self._ring = bytearray(max(64, rxbuf))
        self._head = self._tail = 0
        self.overruns = 0
        s = self._sock = _hw.connect(b"UART %d %d" % (self._id, baudrate))
        _thread.start_new_thread(self._rx, (s,))

    def _rx(self, s):
        ring = self._ring
        n = len(ring)
        while self._sock is s:
            try:
                b = s.recv(1024)
            except OSError:
                break
            if not b:
                break
            for c in b:
                if self._head - self._tail >= n:
                    self.overruns += 1
                else:
                    ring[self._head % n] = c
                    self._head += 1
        s.close()

    def deinit(self):
        s, self._sock = self._sock, None
        if s:
            try:
                s.write(b"BYE")
            except OSError:
                pass

    def any(self):
        return self._head - self._tail

    def readinto(self, buf, n=None):
        k = min(len(buf) if n is None else n, self._head - self._tail)
        ring = self._ring
        m = len(ring)
        t = self._tail
        for i in range(k):
            buf[i] = ring[(t + i) % m]
        self._tail = t + k
        return k or None

    def read(self, n=-1):
        k = self.any() if n < 0 else min(n, self.any())
        b = bytearray(k)
        self.readinto(b)
        return bytes(b)

    def write(self, b):
        return len(b)


class _Irq:
    def __init__(self, can):
        self._can = can

    def flags(self):
        f = self._can._irqflags
        self._can._irqflags = 0
        return f

    def trigger(self, t=None):
        return self._can._trigger


_RINGS = {}     # controller id -> its RX ring block


class CAN:
    """machine.CAN over the virtual bus; RX through a ring (VDEV_CAN_RING slots, the board's) that counts overruns."""
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
    IRQ_TX_FAILED = 8
    IRQ_TX_IDX_SHIFT = 8
    IRQ_TX_IDX_MASK = 0xFF
    TX_QUEUE_LEN = 8
    FILTERS_MAX = 4
    RX_RING = int(os.getenv("VDEV_CAN_RING") or 16)

    def __init__(self, id, *args, **kw):
        if not 1 <= id <= 2:
            raise ValueError("CAN(%d) doesn't exist" % id)
        self._id = id
        self._sock = None
        self._state = CAN.STATE_STOPPED
        # one block (16 bytes a frame) per controller, kept across instances: the board's
        # driver has it as a static array, allocated once, never from a fragmented heap
        r = _RINGS.get(id)
        if r is None:
            r = _RINGS[id] = bytearray(16 * CAN.RX_RING)
        self._ring = r
        self._head = self._tail = 0
        self._cnt = [0] * 8  # tec, rec, warn, passive, busoff, txp, rxp, overruns
        self._ovr = False
        self._filters = ()
        self._handler = None
        self._trigger = 0
        self._irqflags = 0
        self._pending = False
        self._irq_cb = self._irq_run
        self._irq_obj = _Irq(self)
        self._views = None
        self._txn = 0
        self._txrec = bytearray(16)
        self.init(*args, **kw)

    def init(self, bitrate, mode=0, sample_point=75, sjw=1, tseg1=None, tseg2=None):
        if not 0 <= mode <= 4:
            raise ValueError("mode")
        self.deinit()
        self._bitrate = bitrate
        self._mode = mode
        self._cnt = [0] * 8
        self._head = self._tail = 0
        self._filters = ()
        s = _hw.connect(b"CAN %d %d %d" % (self._id, bitrate, mode))
        self._paced = s.recv(16) == b"P"  # P: real-time bus; B: the bus waits for us
        self._sock = s
        self._state = CAN.STATE_ACTIVE
        _thread.start_new_thread(self._rx, (s,))

    def deinit(self):
        s, self._sock = self._sock, None
        if s:
            try:
                s.write(b"BYE")  # the host hangs up; the RX thread sees EOF and closes
            except OSError:
                pass
        self._state = CAN.STATE_STOPPED

    def __repr__(self):
        return "CAN(%d, bitrate=%d, mode=%d)" % (self._id, self._bitrate, self._mode)

    def _check(self):
        if self._sock is None:
            raise OSError(22)

    # --- "ISR": runs in its own thread, never in the firmware's context ---
    def _accept(self, fid, flags):
        f = self._filters
        if f is None:
            return True
        for fi, mask, ff in f:
            if (ff & 2) == (flags & 2) and (fid & mask) == (fi & mask):
                return True
        return False

    def _rx(self, s):
        rec = bytearray(16)
        ring = self._ring
        n = CAN.RX_RING
        while self._sock is s:
            try:
                k = s.readinto(rec)
            except OSError:
                break
            if not k:
                break
            if rec[6] == 1:  # bus state injected by the host
                self._set_state(rec[8])
                continue
            if self._mode == CAN.MODE_SLEEP or self._state == CAN.STATE_BUS_OFF:
                continue
            fid = rec[0] | rec[1] << 8 | rec[2] << 16 | rec[3] << 24
            if not self._accept(fid, rec[4]):
                continue
            if not self._paced:
                while self._head - self._tail >= n and self._sock is s:
                    time.sleep_ms(1)
            if self._head - self._tail >= n:
                self._cnt[7] += 1
                self._ovr = True
            else:
                o = (self._head % n) * 16
                for i in range(16):
                    ring[o + i] = rec[i]
                self._head += 1
            self._fire(CAN.IRQ_RX)
        s.close()

    def _set_state(self, st):
        c = self._cnt
        self._state = st
        if st == CAN.STATE_BUS_OFF:
            c[0] = 256
            c[4] += 1
        elif st == CAN.STATE_PASSIVE:
            c[0] = 128
            c[3] += 1
        elif st == CAN.STATE_WARNING:
            c[0] = 96
            c[2] += 1
        else:
            c[0] = 0
        self._fire(CAN.IRQ_STATE)

    def _fire(self, what):
        if self._trigger & what and self._handler:
            self._irqflags |= what
            if not self._pending:
                self._pending = True
                try:
                    micropython.schedule(self._irq_cb, None)
                except RuntimeError:
                    self._pending = False

    def _irq_run(self, _):
        self._pending = False
        h = self._handler
        if h:
            h(self)

    # --- public API (machine.CAN) ---
    def irq(self, handler=None, trigger=0, hard=False):
        self._check()
        if handler is not None or trigger:
            if trigger & ~7:
                raise ValueError("trigger 0x%08x unsupported" % (trigger & ~7))
            self._handler = handler
            self._trigger = trigger
        return self._irq_obj

    def set_filters(self, filters):
        self._check()
        if filters is None:
            self._filters = None
            return
        fl = []
        for item in filters:
            if len(item) != 3:
                raise ValueError("filter items must have length 3")
            fid, mask, flags = item
            lim = (1 << 29) if flags & 2 else (1 << 11)
            if not (0 <= fid < lim and 0 <= mask < lim):
                raise ValueError("invalid id")
            fl.append((fid, mask, flags))
        if len(fl) > CAN.FILTERS_MAX:
            raise ValueError("too many filters")
        self._filters = tuple(fl)

    def recv(self, arg=None):
        self._check()
        if self._head == self._tail:
            return None
        n = CAN.RX_RING
        full = self._head - self._tail >= n
        rec = self._ring
        o = (self._tail % n) * 16
        if arg is None:
            arg = [0, memoryview(bytearray(8)), 0, 0]
        v = self._views
        m = arg[1]
        known = v is not None and m is v[0]
        if v is not None and not known:
            for x in v[1]:
                if x is m:
                    known = True
                    break
        if not known:
            v = self._views = _views(m)
        base = v[0]
        dlc = rec[o + 5]
        if rec[o + 4] & 1:
            for i in range(dlc):
                base[i] = 0
        else:
            for i in range(dlc):
                base[i] = rec[o + 8 + i]
        arg[0] = rec[o] | rec[o + 1] << 8 | rec[o + 2] << 16 | rec[o + 3] << 24
        arg[1] = v[1][dlc]
        arg[2] = rec[o + 4] & 3
        arg[3] = (2 if self._ovr else 0) | (1 if full else 0)
        self._ovr = False
        self._tail += 1
        return arg

    def send(self, id, data, flags=0):
        self._check()
        if self._state == CAN.STATE_BUS_OFF:
            raise OSError(5)
        if self._mode in (CAN.MODE_SILENT, CAN.MODE_SLEEP):
            raise OSError(1)  # listen-only: the TWAI cannot transmit
        lim = (1 << 29) if flags & 2 else (1 << 11)
        if not 0 <= id < lim:
            raise ValueError("invalid id")
        if len(data) > 8:
            raise OverflowError("data too long")
        r = self._txrec
        r[0], r[1], r[2], r[3] = id & 255, id >> 8 & 255, id >> 16 & 255, id >> 24 & 255
        r[4] = flags & 3
        r[5] = len(data)
        for i in range(8):
            r[8 + i] = data[i] if i < len(data) else 0
        try:
            self._sock.write(r)
        except OSError:
            return None
        idx = self._txn % CAN.TX_QUEUE_LEN
        self._txn += 1
        if self._mode in (CAN.MODE_LOOPBACK, CAN.MODE_SILENT_LOOPBACK) and self._head - self._tail < CAN.RX_RING:
            o = (self._head % CAN.RX_RING) * 16
            for i in range(16):
                self._ring[o + i] = r[i]
            self._head += 1
            self._fire(CAN.IRQ_RX)
        if self._trigger & CAN.IRQ_TX:
            self._irqflags |= idx << CAN.IRQ_TX_IDX_SHIFT
            self._fire(CAN.IRQ_TX)
        return idx

    def cancel_send(self, index):
        return False

    def state(self):
        return self._state if self._sock else CAN.STATE_STOPPED

    def restart(self):
        self._check()
        self._state = CAN.STATE_ACTIVE
        c = self._cnt
        for i in range(5):
            c[i] = 0

    def get_counters(self, lst=None):
        self._check()
        c = self._cnt
        if lst is None:
            lst = [0] * 8
        for i in range(8):
            lst[i] = c[i]
        lst[5] = 0
        lst[6] = self._head - self._tail
        return lst

    def get_timings(self, lst=None):
        if lst is None:
            lst = [0] * 6
        lst[0], lst[1], lst[2], lst[3], lst[4], lst[5] = self._bitrate, 1, 13, 2, None, None
        return lst
