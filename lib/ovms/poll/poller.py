"""Poller: runs a poll list over ISO-TP per bus by vehicle state, answers into metrics, per-ECU counts."""
import array
import asyncio
import time
from micropython import const
from ovms import metrics
from ovms.poll import isotp

# vehicle states (columns of an entry's intervals); ASLEEP: nothing is polled
ASLEEP = const(-1)
OFF = const(0)
AWAKE = const(1)
ON = const(2)
CHARGING = const(3)
STATES = ("off", "awake", "on", "charging")

# entry flags
F_EXT = const(1)        # 29-bit ids
F_DISCOVER = const(2)   # OBD-II mode 01 "PIDs supported" bitmap (PID 0x00, 0x20, ...)

# value kinds
K_U = const(0)          # unsigned big-endian
K_S = const(1)          # signed big-endian
K_ULE = const(2)        # unsigned little-endian
K_SLE = const(3)        # signed little-endian
K_BIT = const(4)        # one bit: (byte >> bit) & 1
K_EXPR = const(5)       # a compiled PID expression (ovms.poll.expr): (metric, WiCAN byte
K_EXPRB = const(6)      # numbering, 0, kind, code, constants, valid (low, high) or None); B: bool

# per-ECU counters (rows of Poller.stat)
_ANS = const(0)
_TMO = const(1)
_NRC = const(2)
_ERR = const(3)
_LAST = const(4)        # uptime (s) of the last answer, 0 = never
_FAILS = const(5)       # timeouts in a row (backoff)
_UNTIL = const(6)       # uptime (s) until which the ECU is backed off
_NSTAT = const(7)
_BACKOFF_AFTER = const(3)
_BACKOFF_MAX = const(300)

_cur = None


def current():
    return _cur


def value(buf, off, n, v):
    """The raw value of v = (metric, start, size, kind, bit, scale, offset) in buf[off:off+n],
    scaled; None if the answer is too short."""
    s, z, k = v[1] + off, v[2], v[3]
    if k >= K_EXPR:
        from ovms.poll import expr
        x = expr.run(v[4], v[5], buf, off, n, v[1])
        lim = v[6]
        if x is None or (lim and not lim[0] <= x <= lim[1]):
            return None
        return x
    if s + z > n or z < 1:
        return None
    if k == K_BIT:
        return (buf[s] >> v[4]) & 1
    r = 0
    if k == K_ULE or k == K_SLE:
        for i in range(z - 1, -1, -1):
            r = r << 8 | buf[s + i]
    else:
        for i in range(z):
            r = r << 8 | buf[s + i]
    if (k == K_S or k == K_SLE) and r >> (8 * z - 1):
        r -= 1 << (8 * z)
    sc, of = v[5], v[6]
    if sc == 1 and of == 0:
        return r
    return r * sc + of


class Poller:
    """entries: the poll list (see firmware/vehicles/README.md, "poll"); buses: {bus index:
    CanBus}. One request in flight per bus, gap ms between requests, ECUs that do not answer
    backed off. opts: size, bs, stmin, pad, timeout (ms), gap (ms), sleep (s without traffic =
    asleep), vmin (V: below it on the 12 V battery nothing is polled unless on or charging)."""

    def __init__(self, entries, buses, size=1024, bs=8, stmin=0, pad=0xAA, timeout=1000,
                 gap=10, sleep=10, vmin=0):
        self.entries = entries
        self.gap, self.sleep, self.vmin = gap, sleep, vmin
        self.ch = {}
        self.bus = buses
        for i, b in buses.items():
            self.ch[i] = isotp.Channel(b.send, size, bs, stmin, pad, timeout)
        self._chl = tuple(self.ch.items())     # iterated every loop without allocating
        self._bl = tuple(buses.items())
        ecus = []
        self.ecu = array.array("B", bytes(len(entries)))
        for k, e in enumerate(entries):
            key = (e[0], e[1], e[2])
            if key not in ecus:
                ecus.append(key)
            self.ecu[k] = ecus.index(key)
        self.ecus = ecus
        self.stat = [array.array("i", bytes(4 * _NSTAT)) for _ in ecus]
        self.due = array.array("i", bytes(4 * len(entries)))     # uptime ms when due
        self.mi = []
        for e in entries:
            row = []
            for v in e[7]:
                m = metrics.find(v[0])
                if m < 0:
                    m = metrics.define(v[0], "b" if v[3] == K_BIT or v[3] == K_EXPRB else "f")
                row.append(m)
            self.mi.append(tuple(row))
        self.sup = bytearray(32)        # OBD-II PIDs supported (bit 7 of byte 0 = PID 0x01)
        self.inflight = {}              # bus -> entry index (-1: a one-off request)
        self.next = {}                  # bus -> entry index to look at first
        self.state = ASLEEP
        self.polls = 0                  # answers received
        self.requests = 0
        self._seen = {}                 # bus -> frames seen at the last check
        self._traffic = 0               # uptime (s) of the last frame that was not ours
        self._consumed = {}             # bus -> frames the poller took
        self._running = True        # until stop()
        self._oneshot = None
        self._gap_until = {}
        for b in buses:
            self._consumed[b] = 0
            self._seen[b] = 0
            self.inflight[b] = -2       # -2: free
            self.next[b] = 0
            self._gap_until[b] = 0

    # ---- frames from the CAN task (CanBus.drain) ------------------------------------
    def tap(self, bus):
        ch = self.ch[bus]
        c = self._consumed

        def t(fid, ext, d):
            if ch.feed(fid, ext, d):
                c[bus] += 1
                return True
            if (fid & 0x1FFFFF00) == 0x18DAF100 if ext else (fid & 0x7F8) == 0x7E8:
                c[bus] += 1         # a late diagnostic answer (another ECU): not car traffic
            return False
        return t

    # ---- vehicle state ---------------------------------------------------------------
    def vstate(self):
        now = metrics.uptime()
        bl = self._bl
        for j in range(len(bl)):
            b, cb = bl[j]
            f = cb.frames - self._consumed[b]
            if f != self._seen[b]:
                self._seen[b] = f
                self._traffic = now
        if metrics.get("v.c.charging"):
            return CHARGING
        if metrics.get("v.e.on"):
            return ON
        v = metrics.get("v.b.12v.voltage")
        if v is not None and v < self.vmin and not metrics.stale("v.b.12v.voltage"):
            return ASLEEP           # 12 V battery low: leave the car alone
        if metrics.get("v.e.awake"):
            return AWAKE
        if self._traffic and now - self._traffic < self.sleep:
            return OFF
        return ASLEEP

    def supported(self, pid):
        if pid <= 0:
            return True
        i = pid - 1
        return bool(self.sup[i >> 3] & (0x80 >> (i & 7)))

    # ---- the loop ----------------------------------------------------------------------
    def _pick(self, bus, now_ms, now_s):
        # next due entry on bus for the current state, or -1
        es = self.entries
        n = len(es)
        st = self.state
        k0 = self.next[bus]
        for j in range(n):
            k = (k0 + j) % n
            e = es[k]
            if e[0] != bus:
                continue
            iv = e[5][st]
            if not iv or time.ticks_diff(now_ms, self.due[k]) < 0:
                continue
            if not self.supported(e[6]):
                continue
            s = self.stat[self.ecu[k]]
            if s[_UNTIL] and now_s < s[_UNTIL]:
                continue
            self.next[bus] = (k + 1) % n
            self.due[k] = time.ticks_add(now_ms, iv * 1000)
            return k
        return -1

    def _done(self, bus, ch):
        k = self.inflight[bus]
        self.inflight[bus] = -2
        self._gap_until[bus] = time.ticks_add(time.ticks_ms(), self.gap)
        if k < 0:
            o = self._oneshot
            if o is not None:       # the answer is copied: the channel serves the list next
                o[6] = bytes(ch.buf[:ch.n]) if ch.state == isotp.DONE else isotp.ERRORS[ch.err]
                o[0] = ch.state
            ch.reset()
            return
        e = self.entries[k]
        s = self.stat[self.ecu[k]]
        now = metrics.uptime()
        if ch.state == isotp.FAIL:
            if ch.err == isotp.E_TIMEOUT:
                s[_TMO] += 1
                s[_FAILS] += 1
                if s[_FAILS] >= _BACKOFF_AFTER:
                    s[_UNTIL] = now + min(_BACKOFF_MAX, 10 << min(s[_FAILS] - _BACKOFF_AFTER, 5))
            else:
                s[_ERR] += 1
            ch.reset()
            return
        b, n, req = ch.buf, ch.n, e[4]
        s[_FAILS] = 0
        s[_UNTIL] = 0
        if n >= 3 and b[0] == 0x7F:
            s[_NRC] += 1
            print("poll: %03x %02x%02x: negative response %02x" % (e[1], req[0], req[1] if len(req) > 1 else 0, b[2]))
            ch.reset()
            return
        h = len(req)
        ok = n >= h and b[0] == req[0] + 0x40
        for i in range(1, h):
            if ok and b[i] != req[i]:
                ok = False
        if not ok:
            s[_ERR] += 1
            ch.reset()
            return
        s[_ANS] += 1
        s[_LAST] = now or 1
        self.polls += 1
        if e[3] & F_DISCOVER:
            base = req[1] >> 3
            for i in range(4):
                if h + i < n and base + i < 32:
                    self.sup[base + i] = b[h + i]
        mi = self.mi[k]
        vs = e[7]
        for j in range(len(vs)):
            x = value(b, h, n, vs[j])
            if x is not None:
                try:
                    metrics.set(mi[j], x)
                except ValueError:
                    s[_ERR] += 1
        ch.reset()

    async def run(self):
        global _cur
        _cur = self
        t_state = 0
        try:
            while self._running:
                now_ms = time.ticks_ms()
                if time.ticks_diff(now_ms, t_state) >= 0:
                    t_state = time.ticks_add(now_ms, 500)
                    st = self.vstate()
                    if st != self.state:
                        self.state = st
                        for k in range(len(self.due)):
                            self.due[k] = now_ms
                busy = False
                now_s = metrics.uptime()
                chl = self._chl
                for j in range(len(chl)):
                    bus, ch = chl[j]
                    if self.inflight[bus] != -2:
                        st = ch.poll()
                        if st >= isotp.DONE:
                            self._done(bus, ch)
                        else:
                            busy = True
                        continue
                    if time.ticks_diff(now_ms, self._gap_until[bus]) < 0:
                        busy = True
                        continue
                    o = self._oneshot
                    if o is not None and o[0] == -1 and o[1] == bus:
                        o[0] = -3
                        self.inflight[bus] = -1
                        self.requests += 1
                        try:
                            ch.start(o[2], o[3], o[4], o[5])
                        except ValueError:
                            ch._fail(isotp.E_FORMAT)
                        busy = True
                        continue
                    if self.state == ASLEEP:
                        continue
                    k = self._pick(bus, now_ms, now_s)
                    if k >= 0:
                        e = self.entries[k]
                        self.inflight[bus] = k
                        self.requests += 1
                        ch.start(e[1], e[2], e[3] & F_EXT, e[4])
                        busy = True
                await asyncio.sleep_ms(1 if busy else 20)
        finally:
            self._running = False
            if _cur is self:
                _cur = None

    def stop(self):
        self._running = False

    async def request(self, bus, txid, rxid, ext, req, timeout=10000):
        """One-off request (shell): (True, answer bytes) or (False, error text)."""
        if bus not in self.ch:
            return False, "no bus can%d" % bus
        end = time.ticks_add(time.ticks_ms(), timeout)
        while self._oneshot is not None:
            if time.ticks_diff(end, time.ticks_ms()) < 0:
                return False, "poller busy"
            await asyncio.sleep_ms(10)
        o = self._oneshot = [-1, bus, txid, rxid, ext, req, None]
        try:
            while o[0] < 0:
                if not self._running:
                    return False, "poller stopped"
                if time.ticks_diff(end, time.ticks_ms()) < 0 and o[0] == -1:
                    return False, "poller busy"
                await asyncio.sleep_ms(5)
            return o[0] == isotp.DONE, o[6]
        finally:
            self._oneshot = None

    def status(self):
        """Lines of the per-ECU listing (`obd status`)."""
        now = metrics.uptime()
        st = "asleep" if self.state == ASLEEP else STATES[self.state]
        out = ["Poller: state %s, %d entries, %d requests, %d answers" % (
            st, len(self.entries), self.requests, self.polls)]
        out.append("bus  tx       rx       answers timeouts   nrc errors  age backoff")
        for j, (bus, tx, rx) in enumerate(self.ecus):
            s = self.stat[j]
            out.append("can%d %-8x %-8s %7d %8d %5d %6d %4s %s" % (
                bus, tx, "%x" % rx if rx else "any", s[_ANS], s[_TMO], s[_NRC], s[_ERR],
                (now - s[_LAST]) if s[_LAST] else "-",
                "%ds" % (s[_UNTIL] - now) if s[_UNTIL] > now else "-"))
        for bus, ch in self.ch.items():
            out.append("can%d transfers failed %d, answers too long %d (limit %d)" % (
                bus, ch.errors, ch.too_long, ch.size))
        return out


def configured(vehicle, obd, config):
    """The poll list to run (the vehicle's, plus the generic OBD-II one if obd), the extra
    receive ids per bus and the options from config; None if there is nothing to poll."""
    entries = tuple(getattr(vehicle, "poll", ()) or ())
    if obd:
        from ovms.poll import obd as o
        entries = entries + o.POLL
    if not entries:
        return None
    ids = {}
    for e in entries:
        b = ids.setdefault(e[0], [])
        ext = bool(e[3] & F_EXT)
        if e[2]:
            r = [e[2]]
        elif ext:
            r = [0x18DAF100 | k for k in (0x10, 0x11, 0x17, 0x18, 0x28)]
        else:
            r = list(range(0x7E8, 0x7F0))
        for x in r:
            if (x, ext) not in b:
                b.append((x, ext))
    pad = config.get("poll", "pad")
    opts = dict(size=config.get("poll", "buffer"), bs=config.get("poll", "bs"),
                stmin=config.get("poll", "stmin"), pad=-1 if pad == "none" else int(pad, 16),
                timeout=config.get("poll", "timeout"), gap=config.get("poll", "gap"),
                sleep=config.get("poll", "sleep"), vmin=config.get("poll", "12v.min") / 10)
    return entries, ids, opts


def start(poll, buses):
    """Create the poller for poll = configured(...) on the CanBus list buses, tap their
    receive paths; returns the coroutine to run as the app's task."""
    global _cur
    entries, _, opts = poll
    bm = {}
    for b in buses:
        bm[b.index] = b
    p = Poller(tuple(e for e in entries if e[0] in bm), bm, **opts)
    for i, b in bm.items():
        b.tap = p.tap(i)
    _cur = p
    return p.run()


def adhoc(buses):
    """A poller with an empty list on buses (for one-off requests when none runs)."""
    c = start(((), {}, {}), buses)
    asyncio.create_task(c)
    return _cur


def stop():
    global _cur
    p = _cur
    if p is not None:
        p.stop()
        for b in p.bus.values():
            b.tap = None
    _cur = None
