"""Delta publishing for OVMS v3 metric topics: deadband, min interval, state intervals, stale."""
# Which metric goes out when (the server does the sending):
# - A change (metrics change bit for MQTT) is worth publishing when the metric was never
#   published this boot, or its text (metrics.text, at its display precision) differs from
#   the text last published and it has no deadband or moved by at least its deadband from
#   the value last published (so slow drifts add up and still go out).
# - A metric is published at most once per R seconds, R = max(state interval, metric
#   min_interval); priority metrics use R = min_interval only (immediate by default).
#   The first change after a quiet period goes out at once; a change inside R waits until
#   R has passed since the last publication. So R is also the upper bound on how old the
#   broker's value can be (beyond the deadband). The state interval follows OVMS:
#   v.e.on -> on, v.c.charging -> charging, peers -> connected, v.e.awake -> awake, else idle.
#   When the state interval gets longer (car switched off, charge stopped, last peer gone),
#   everything pending goes out at once (min_interval still honoured), like OVMS's flush on
#   vehicle.off / charge.stop events, so the final state is not held back by the long interval.
# - No periodic full resend: after a (re)connect the server republishes everything once.
# - Default policy: a metric whose own policy is unset (metrics.deadband == 0 and
#   metrics.min_interval == 0, i.e. neither the metric table nor the vehicle definition set
#   one) gets a data-saver default: a deadband of about the display precision of its unit
#   for numbers (_DB_UNIT, _DB_NAME); a min interval of 60 s for vectors (cell voltages...)
#   and for vehicle-specific numbers (x<code>.*: wheel speeds, steering, raw sensor values),
#   3600 s for the module's own numbers (m.*: uptime, clock, free RAM, CAN counters; not
#   m.net.*). Standard vehicle numbers and every bool/string keep the state interval. Set an
#   explicit policy with metrics.configure() (or deadband/min_interval in vehicle.json) to
#   override; a tiny deadband (1e-9) means "every change".
# - Stale markers: see ovms.v3.server.
import array
from micropython import const

from ovms import metrics

_PEND = const(1)    # change waiting to be published
_PUB = const(2)     # published this boot: _lpt / _lpv are valid
_STALE = const(4)   # stale marker set on the broker
_SKIP = const(8)    # excluded by metrics.include / metrics.exclude
_PRIO = const(16)   # priority (metric flag or config metrics.priority)
_NUM = const(32)    # numeric value (deadband applies)
_FAR = const(0x3FFFFFFF)

# default policies: deadband by unit (index into _DB), min interval by name (into _MI)
_DB = (0.0, 0.1, 0.5, 1.0, 0.0001, 10.0, 50.0)
_MI = (0, 60, 3600)
_DB_NAME = (("v.b.12v.", 1), ("v.p.latitude", 4), ("v.p.longitude", 4),
            ("v.p.odometer", 1), ("v.p.trip", 1))
_DB_UNIT = {"km": 1, "kWh": 1, "Ah": 1, "\u00b0C": 2, "%": 2, "kW": 2, "A": 2, "V": 2,
            "km/h": 3, "\u00b0": 3, "m/s\u00b2": 3, "kPa": 3, "m": 3, "Wh/km": 3, "dBm": 3,
            "Nm": 3, "deg": 3, "deg/s": 3, "\u00b0/s": 3, "W": 5, "rpm": 6}


def patterns(s):
    """Config pattern list "v.b.*,m.net*,v.p.speed" -> list of (prefix, exact)."""
    r = []
    for p in (s or "").split(","):
        p = p.strip()
        if p:
            if p.endswith("*"):
                r.append((p.rstrip("*"), False))
            else:
                r.append((p, True))
    return r


def matches(name, pats):
    for p, exact in pats:
        if name == p if exact else name.startswith(p):
            return True
    return False


class Scheduler:
    """Per-metric publish state (a few bytes per metric) and the due-time rules above."""

    def __init__(self, intervals=(5, 10, 10, 60, 600), include="", exclude="", priority=""):
        self.iv = intervals   # on, charging, connected (peers), awake, idle
        self.peers = 0
        self.inc = patterns(include)
        self.exc = patterns(exclude)
        self.prio = patterns(priority)
        self.n = 0
        self._fl = bytearray(0)
        self._dc = bytearray(0)
        self._lpt = array.array("i")
        self._lpv = array.array("f")
        self._pl = []
        self._next = 0
        self._last_iv = 0
        self._flush = False
        self._st = (metrics.find("v.e.on"), metrics.find("v.c.charging"),
                    metrics.find("v.e.awake"))
        self.resize()

    def configure(self, intervals=None, include=None, exclude=None, priority=None):
        if intervals:
            self.iv = intervals
        if include is not None:
            self.inc = patterns(include)
        if exclude is not None:
            self.exc = patterns(exclude)
        if priority is not None:
            self.prio = patterns(priority)
        for i in range(self.n):
            self._classify(i)
        self._next = 0

    def resize(self):
        """Follow metrics added with metrics.define() since the last call."""
        n = metrics.count()
        if n <= self.n:
            return
        k = n - self.n
        self._fl.extend(bytes(k))
        self._dc.extend(bytes(k))
        self._lpt.extend(array.array("i", bytes(4 * k)))
        self._lpv.extend(array.array("f", bytes(4 * k)))
        old = self.n
        self.n = n
        for i in range(old, n):
            self._classify(i)

    def _classify(self, i):
        nm = metrics.name(i)
        f = self._fl[i] & (_PEND | _PUB | _STALE)
        if (self.inc and not matches(nm, self.inc)) or matches(nm, self.exc):
            f |= _SKIP
        if metrics.priority(i) or matches(nm, self.prio):
            f |= _PRIO
        tc = metrics.typecode(i)
        if tc in "fi":
            f |= _NUM
        self._fl[i] = f
        d = 0
        if tc in "vw":
            d = 1 << 4                       # vectors: every 60 s at most
        elif tc in "fiDT":
            for p, k in _DB_NAME:
                if nm.startswith(p):
                    d = k
                    break
            else:
                d = _DB_UNIT.get(metrics.unit(i), 0)
            if nm.startswith("m.") and not nm.startswith("m.net."):
                d = 2 << 4                   # module housekeeping numbers: hourly
            elif nm[0] == "x":
                d |= 1 << 4                  # vehicle-specific numbers: every 60 s at most
        self._dc[i] = d

    def policy(self, i):
        """(deadband, min_interval) used for metric i: its own, else the default."""
        db = metrics.deadband(i)
        mi = metrics.min_interval(i)
        if not db and not mi:
            d = self._dc[i]
            return _DB[d & 15], _MI[d >> 4]
        return db, mi

    def included(self, i):
        return not self._fl[i] & _SKIP

    def interval(self):
        """Current state interval (s)."""
        on, ch, aw = self._st
        if on >= 0 and metrics.get(on):
            return self.iv[0]
        if ch >= 0 and metrics.get(ch):
            return self.iv[1]
        if self.peers:
            return self.iv[2]
        if aw >= 0 and metrics.get(aw):
            return self.iv[3]
        return self.iv[4]

    def bound(self, i):
        """Seconds within which a change of metric i is published (its interval bound)."""
        r = self.policy(i)[1]
        if not self._fl[i] & _PRIO:
            r = max(r, self.interval())
        return r

    def _moved(self, i):
        # True if metric i differs from its published value by at least its deadband
        f = self._fl[i]
        if not f & _PUB or not f & _NUM:
            return True
        v = metrics.get(i)
        if v is None:
            return True
        lp = self._lpv[i]
        db = self.policy(i)[0]
        if db > 0 and abs(v - lp) < db:
            return False
        # a change below the display precision (the same text) is no change
        return not isinstance(v, float) or not metrics.same(i, v, lp)

    def collect(self):
        """Take the metrics' MQTT change bits; significant changes become pending."""
        self.resize()
        fl = self._fl
        i = metrics.next_modified(metrics.MQTT, 0)
        while i >= 0:
            f = fl[i]
            if not f & (_SKIP | _PEND) and self._moved(i):
                fl[i] = f | _PEND
                self._pl.append(i)
                if f & _PUB:
                    mi = self.policy(i)[1]
                    t = self._lpt[i] + (mi if f & _PRIO else max(mi, self._last_iv))
                    if t < self._next:
                        self._next = t
                else:
                    self._next = 0
            i = metrics.next_modified(metrics.MQTT, i + 1)

    def flush(self):
        """Make every pending change due now (min_interval still honoured)."""
        self._flush = True
        self._next = 0

    def due(self, now):
        """List of pending metrics to publish at uptime `now` (s); they leave the pending
        set, the caller publishes each and calls sent(i, now)."""
        iv = self.interval()
        if iv != self._last_iv:
            if iv > self._last_iv > 0:
                self._flush = True   # e.g. the car was switched off: send its final state
            self._last_iv = iv
            self._next = 0
        if not self._pl or now < self._next:
            return ()
        fl = self._fl
        lpt = self._lpt
        out = []
        keep = []
        nxt = _FAR
        fls = self._flush
        self._flush = False
        for i in self._pl:
            f = fl[i]
            mi = self.policy(i)[1]
            r = mi if f & _PRIO or fls else max(mi, iv)
            t = lpt[i] + r
            if not f & _PUB or now >= t:
                fl[i] = f & ~_PEND
                if self._moved(i):
                    out.append(i)
            else:
                keep.append(i)
                if t < nxt:
                    nxt = t
        self._pl = keep
        self._next = nxt
        return out

    def pending(self):
        return len(self._pl)

    def changed(self, i):
        """True if metric i was never published or has a significant change not sent yet."""
        fl = self._fl
        if i >= len(fl):
            return True
        f = fl[i]
        return not f & _PUB or bool(f & _PEND)

    def sent(self, i, now):
        """Record that metric i's current value went out at `now`."""
        f = self._fl[i]
        self._fl[i] = (f | _PUB) & ~_PEND
        self._lpt[i] = now
        if f & _NUM:
            v = metrics.get(i)
            if v is not None:
                self._lpv[i] = v

    def all(self):
        """Indexes for a full republish: every defined, included metric. Clears pending
        and the metrics' MQTT change bits (the republish carries the current values)."""
        self.resize()
        while metrics.next_modified(metrics.MQTT, 0) >= 0:
            pass
        for i in self._pl:
            self._fl[i] &= ~_PEND
        self._pl = []
        return [i for i in range(self.n)
                if not self._fl[i] & _SKIP and metrics.defined(i)]

    # ---- stale markers ----------------------------------------------------------------

    def marked(self, i):
        return bool(self._fl[i] & _STALE)

    def set_marked(self, i, on):
        if on:
            self._fl[i] |= _STALE
        else:
            self._fl[i] &= ~_STALE

    def marked_all(self):
        """Indexes whose stale marker is set (what metric/s/v3/stale lists)."""
        fl = self._fl
        return [i for i in range(self.n) if fl[i] & _STALE]

    def stale_changes(self, start, count):
        """Published metrics in [start, start+count) whose stale state differs from the
        marker on the broker -> (list of (i, stale), next start or 0 at the end)."""
        out = []
        end = min(self.n, start + count)
        fl = self._fl
        for i in range(start, end):
            f = fl[i]
            if f & _PUB and not f & _SKIP:
                s = metrics.stale(i)
                if s != bool(f & _STALE):
                    out.append((i, s))
        return out, (end if end < self.n else 0)
