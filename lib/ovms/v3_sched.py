"""Delta publishing for OVMS v3 metric topics: deadband, min interval, state intervals, stale."""
# Which metric goes out when (the server does the sending):
# - A change (metrics change bit for MQTT) is worth publishing when the metric was never
#   published this boot, has no deadband, or moved by at least its deadband from the value
#   last published (so slow drifts add up and still go out).
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
# - Stale markers: see ovms.server_v3.
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
        if metrics.typecode(i) in "fi":
            f |= _NUM
        self._fl[i] = f

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
        r = metrics.min_interval(i)
        if not self._fl[i] & _PRIO:
            r = max(r, self.interval())
        return r

    def _moved(self, i):
        # True if metric i differs from its published value by at least its deadband
        f = self._fl[i]
        if not f & _PUB or not f & _NUM:
            return True
        db = metrics.deadband(i)
        if db <= 0:
            return True
        v = metrics.get(i)
        return v is None or abs(v - self._lpv[i]) >= db

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
                    mi = metrics.min_interval(i)
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
            mi = metrics.min_interval(i)
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
