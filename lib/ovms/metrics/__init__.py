"""Metric table: one preallocated, array-backed store of OVMS-style metrics."""
import time
import micropython
from micropython import const

# RAM: every module-level name and function costs heap on the device (the code itself is
# frozen), so this module holds only the state and what runs all the time. Table building,
# binding, persistence, text parsing and rarely used accessors are in metrics.tab and
# metrics.io, reached through __getattr__ (metrics.define(...) works as before): imported on
# first use, dropped again by the next tick(). The table is built at import by metrics.build,
# which fills this module's state without importing it: the imports go one way (tab, io ->
# metrics; metrics -> build at import, tab and io on demand; build -> defs).

# Consumers: one change bit each in a per-metric byte (bits 4..7 are free for others).
MQTT = const(0)
SHELL = const(1)
HA = const(2)
PERSIST = const(3)

# Value types (low 3 bits of the flag byte; public as metrics.T_* from metrics.tab).
_T_FLOAT = const(0)
_T_INT = const(1)
_T_BOOL = const(2)
_T_STR = const(3)
_T_VFLOAT = const(4)
_T_VINT = const(5)
_T_DATE = const(6)     # int, Unix seconds, shown as "YYYY-MM-DD HH:MM:SS UTC"
_T_TIME = const(7)     # int, seconds of the day, shown as "HH:MM:SS"

# Unit labels (native OVMS units), one per line; metrics.UNITS is the list of them and a
# definition's unit letter indexes metrics.UNIT_CHARS (both in metrics.tab; UNIT_CHARS is
# metrics.build's).
_units = "\n%\nkm\nV\nA\nkW\nkWh\n\u00b0C\nAh\nWh/km\nkm/h\nm\nSec\nMin\ndBm\nkPa\n\u00b0\nrpm\nNm\nW\nm/s\u00b2\nHour"

# Flag byte bits (same values in metrics.tab / metrics.io).
_F_TYPE = const(7)
_F_PERSIST = const(8)
_F_PRIO = const(16)
_F_DEF = const(32)     # a locally stored value exists (set, or restored)
_F_REST = const(64)    # the local value was restored from before the reboot
_F_LOCAL = const(128)  # a CAN-bound metric overridden by set()
_NOSLOT = const(0xFFFF)
_EXT = const(0x8000)   # name offset flag: the name lives in _ext, not in the definitions
_MAXI = const(1 << 53)

_ms = time.ticks_ms     # clock source (tests may replace it)
_EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0   # Unix seconds at the port's epoch

# Table storage (built by metrics.build.init; one entry per metric unless noted):
#   _std/_ext name blobs (every name ends with "\n"; the unit is the letter of a definition
#   line in _std, the byte before the name in _ext), _noff name offset (| _EXT: in _ext),
#   _order indexes sorted by name, _fl flags+type, _sp stale class |
#   policy << 4, _dp display precision (0: up to 6 significant digits as OVMS, k + 1: k
#   decimals, from the DBC resolution or the vehicle definition), _src decoder signal or -1, _slot index into _val (numbers set from Python)
#   or _NOSLOT, _tupd uptime of the last update (0 = never), _mod change bits; dicts _obj
#   (str/list values), _ovr (overrides of CAN values), _xlat (CAN value maps); _stt stale
#   timeouts, _pdb/_pmi publish policies (deadband, min interval).
# The state is declared here (this module owns it); metrics.build builds it, metrics.tab
# adds to it.
_n = 0          # metrics in the table
_defs = None    # the standard definitions (metrics.defs.DEFS, in flash on the device)
_dec = None     # the decoder whose signal values CAN-bound metrics read
_std = _ext = _noff = _order = _fl = _sp = _dp = _src = _slot = _tupd = _mod = _val = None
_obj = _ovr = _xlat = _stt = _pdb = _pmi = _derived = None
_up_s = _up_rem = _up_last = 0      # uptime(): whole seconds, ms remainder, last clock read


@micropython.viper
def _vfind(order: ptr16, noff: ptr16, n: int, std: ptr8, ext: ptr8, s: ptr8, ls: int) -> int:
    # binary search of s[0:ls] among the names in order: the first position whose name is
    # >= s, | 0x10000 if that name equals s
    lo = 0
    hi = n
    eq = 0
    while lo < hi:
        mid = (lo + hi) >> 1
        o = int(noff[int(order[mid])])
        a = std
        if o & 0x8000:
            a = ext
            o &= 0x7FFF
        c = 0
        i = 0
        while i < ls:
            ca = int(a[o + i])
            if ca == 10:            # the name ended first
                c = -1
                break
            c = ca - int(s[i])
            if c != 0:
                break
            i += 1
        if c == 0 and int(a[o + ls]) != 10:
            c = 1                   # s is a proper prefix of the name
        if c < 0:
            lo = mid + 1
        else:
            hi = mid
            eq = 0x10000 if c == 0 else 0
    return lo | eq


@micropython.viper
def _vpfx(a: ptr8, o: int, b: ptr8, lb: int) -> int:
    # 1 if the name at a[o:] (ends at "\n") starts with b[0:lb]
    i = 0
    while i < lb:
        c = int(a[o + i])
        if c == 10 or c != int(b[i]):
            return 0
        i += 1
    return 1


@micropython.viper
def _vscan(mod: ptr8, fl: ptr8, start: int, x: int) -> int:
    # first i in [start, x >> 16) with mod bit (x & 255) set (and the priority flag if
    # x & 0x100); clears that bit and returns i, else -1
    n = x >> 16
    bit = x & 255
    pm = 0
    if x & 0x100:
        pm = 16
    i = start
    while i < n:
        if (mod[i] & bit) and (fl[i] & pm) == pm:
            mod[i] = mod[i] & (bit ^ 255)
            return i
        i += 1
    return -1


# metrics.<name> not found here: the rarely used API, imported on demand (see above):
# persistence in metrics.io, the rest (table building, binding, ...) in metrics.tab
_attrs = {"save": "metrics.io", "load": "metrics.io", "*": "metrics.tab"}


def __getattr__(a):
    import ovms
    return ovms.attr(_attrs, a)


def count():
    """Number of metrics in the table."""
    return _n


def find(s):
    """Index of the metric called s, or -1."""
    if not isinstance(s, str):
        return -1
    p = _vfind(_order, _noff, _n, _std, _ext, s, len(s))
    return _order[p & 0xFFFF] if p & 0x10000 else -1


def _idx(m):
    if isinstance(m, int):
        if 0 <= m < _n:
            return m
        raise ValueError("no metric #%d" % m)
    i = find(m)
    if i < 0:
        raise ValueError("unknown metric: %s" % (m,))
    return i


def _rd(m):
    # index for read functions: unknown names read as "not set" (-1), bad indexes raise
    return find(m) if isinstance(m, str) else _idx(m)


def name(i):
    """Name of metric i (a new str)."""
    o = _noff[i]
    if o & _EXT:
        o &= 0x7FFF
        return str(_ext[o:_ext.find(b"\n", o)], "ascii")
    return _std[o:_std.find("\n", o)]


def typecode(i):
    """Type letter of metric i (one of metrics.TYPES)."""
    return "fibsvwDT"[_fl[_idx(i)] & _F_TYPE]


def deadband(i):
    """Smallest change worth publishing for metric i (0 = any change)."""
    return _pdb[_sp[_idx(i)] >> 4]


def min_interval(i):
    """Minimum seconds between two publications of metric i (0 = none)."""
    return _pmi[_sp[_idx(i)] >> 4]


def uptime():
    """Monotonic seconds since boot (>= 1), the clock of ages and staleness."""
    global _up_s, _up_rem, _up_last
    t = _ms()
    d = time.ticks_diff(t, _up_last)
    if d > 0:
        _up_last = t
        _up_rem += d
        if _up_rem >= 1000:
            _up_s += _up_rem // 1000
            _up_rem %= 1000
    return _up_s + 1


# ---- values --------------------------------------------------------------------

def _coerce(t, v):
    if isinstance(v, str):
        if t == _T_STR:
            return v
        import ovms
        return ovms.load("metrics.io").parse(t, v)
    if t == _T_FLOAT:
        if isinstance(v, (int, float, bool)) and v == v and v - v == 0:
            return float(v)
    elif t == _T_BOOL:
        if isinstance(v, (int, bool)):
            return bool(v)
    elif t == _T_INT or t == _T_DATE or t == _T_TIME:
        if isinstance(v, float) and v == v and v - v == 0:
            v = round(v)
        if isinstance(v, (int, bool)):
            v = int(v)
            if -_MAXI < v < _MAXI and (t != _T_TIME or 0 <= v < 86400):
                return v
            raise ValueError("value out of range: %d" % v)
    elif t == _T_VFLOAT or t == _T_VINT:
        if isinstance(v, (list, tuple)):
            r = []
            for x in v:
                r.append(_coerce(t - 4, x))
            return r
    raise ValueError("%s is not a %s value" % (type(v).__name__, __getattr__("TYPE_NAMES")[t]))


def _conv(i, v):
    # physical value from the decoder -> metric value (None: no valid value)
    x = _xlat.get(i)
    if x is not None:
        if isinstance(x, dict):
            return x.get(v if isinstance(v, str) else int(v) if v == int(v) else v)
        if isinstance(v, str) or not x[0] <= v <= x[1]:
            return None
    t = _fl[i] & _F_TYPE
    if isinstance(v, str):
        return v if t == _T_STR else None
    if t == _T_FLOAT:
        return float(v)
    if t == _T_BOOL:
        return v != 0
    if t == _T_STR:
        return _ftext(v, _dp[i])
    return round(v)


def _local(i):
    f = _fl[i]
    if not f & _F_DEF:
        return None
    t = f & _F_TYPE
    if t == _T_STR or t == _T_VFLOAT or t == _T_VINT:
        v = _obj.get(i)
        return list(v) if isinstance(v, list) else v
    v = _val[_slot[i]]
    if t == _T_FLOAT:
        return v
    if t == _T_BOOL:
        return v != 0
    return int(v)


def get(m):
    """Value of a metric (float/int/bool/str/list); None if never set or no such name."""
    i = _rd(m)
    if i < 0:
        return None
    k = _src[i]
    if k >= 0 and _dec is not None and _tupd[i]:
        # VAL_ labels only for strings and value maps
        v = _dec.value(k, (_fl[i] & _F_TYPE) == _T_STR or i in _xlat)
        f = _fl[i]
        if f & _F_LOCAL:
            if v == _ovr.get(i):
                return _local(i)
            _fl[i] = f & ~_F_LOCAL      # the vehicle reported a new value: override ends
            _ovr.pop(i, None)
        if v is not None:
            v = _conv(i, v)
            if v is not None:
                return v
    return _local(i)


def _store(i, t, v):
    # store v locally; True if it differs from the previous local value
    f = _fl[i]
    if t == _T_STR or t == _T_VFLOAT or t == _T_VINT:
        o = _obj.get(i)
        changed = not (f & _F_DEF) or (o != v and (t != _T_VFLOAT or not same(i, o, v)))
        _obj[i] = v
    else:
        s = _slot[i]
        if s == _NOSLOT:
            s = len(_val)
            _val.append(0)
            _slot[i] = s
        o = _val[s]
        changed = not (f & _F_DEF) or (t != _T_FLOAT and o != v) or not same(i, o, v)
        _val[s] = v     # (kept at full precision: a change below the display precision
                        # is no change, yet slow drifts add up)
    _fl[i] = f | _F_DEF
    return changed


def set(m, value):
    """Set a metric; True if the value changed. Raises ValueError on a bad value."""
    i = _idx(m)
    f = _fl[i]
    t = f & _F_TYPE
    if value is None:
        raise ValueError("None is not a value (use clear)")
    v = _coerce(t, value)
    k = _src[i]
    if k >= 0 and _dec is not None:
        # overrides the decoded value until the vehicle reports a different one
        old = get(i)
        _store(i, t, v)
        _ovr[i] = _dec.value(k, t == _T_STR or i in _xlat)
        _fl[i] = (_fl[i] | _F_LOCAL) & ~_F_REST
        changed = old != v and (t != _T_FLOAT or old is None or not same(i, old, v))
    else:
        changed = _store(i, t, v) or bool(f & _F_REST)
        _fl[i] &= ~_F_REST
    _tupd[i] = uptime()
    if changed:
        _mod[i] = 0xFF
    return changed


def defined(m):
    """True if the metric has a value (set this boot, decoded, or restored)."""
    i = _rd(m)
    if i < 0:
        return False
    if _fl[i] & _F_DEF:
        return True
    if _tupd[i] and _src[i] >= 0 and _dec is not None and i in _xlat:
        return get(i) is not None      # decoded, but maybe outside its map / valid range
    return bool(_tupd[i])


def age(m):
    """Seconds since the last update, or None (never set, or restored from before a reboot)."""
    i = _rd(m)
    if i < 0:
        return None
    t = _tupd[i]
    return uptime() - t if t else None


def stale(m):
    """True if a defined metric was not updated within its timeout (restored: stale
    when it has a timeout)."""
    i = _rd(m)
    if i < 0:
        return False
    to = _stt[_sp[i] & 15]
    if not to or not defined(i):
        return False
    t = _tupd[i]
    return not t or uptime() - t > to


def _ftext(v, p=0):
    # p = 0: up to 6 significant digits (OVMS's default ostream format); k + 1: k decimals,
    # trailing zeros dropped (OVMS drops them too)
    if p:
        r = "%.*f" % (p - 1, v)
        if p > 1:
            r = r.rstrip("0").rstrip(".")
    else:
        r = "%.6g" % v
    return "0" if r == "-0" else r


def same(i, a, b):
    """True if values a and b (floats, float lists) read the same at metric i's precision."""
    if a == b:
        return True
    p = _dp[i]
    if isinstance(a, list):
        if len(a) != len(b):
            return False
        for k in range(len(a)):
            if not _same(a[k], b[k], p):
                return False
        return True
    return _same(a, b, p)


def _same(a, b, p):
    # texts equal => a and b differ by at most one unit of the last digit shown: a larger
    # difference needs no text (two floats made at most: set() runs on every change)
    d = a - b if a > b else b - a
    if p:
        u = 10 ** (1 - p)           # (int constants: a float constant costs heap)
    else:
        u = abs(a)
        if abs(b) > u:
            u = abs(b)
        u /= 50000                  # > one unit of the 6th significant digit
    if d > u:
        return False
    return _ftext(a, p) == _ftext(b, p)


def text(m):
    """OVMS payload text: yes/no, floats at their display precision, a,b,c vectors, "" if
    unset (the same text goes to MQTT, the shell and the saved metrics)."""
    i = _rd(m)
    if i < 0:
        return ""
    v = get(i)
    if v is None:
        return ""
    t = _fl[i] & _F_TYPE
    if t == _T_STR:
        return v
    if v is True or v is False:
        return "yes" if v else "no"
    if isinstance(v, float):
        return _ftext(v, _dp[i])
    if t == _T_INT:
        return str(v)
    import ovms
    return ovms.load("metrics.io").text(t, v, _dp[i])     # vectors, dates and times


# ---- change tracking -------------------------------------------------------------

def next_modified(consumer, start=0, priority_only=False):
    """Next index >= start whose change bit for consumer is set (cleared on return), or -1."""
    return _vscan(_mod, _fl, start if start > 0 else 0,
                  (_n << 16) | (0x100 if priority_only else 0) | (1 << consumer))


def persist_due():
    """True if a persisted metric changed since the last save()."""
    b = 1 << PERSIST
    for i in range(_n):
        if _fl[i] & _F_PERSIST and _mod[i] & b:
            return True
    return False


# ---- housekeeping -------------------------------------------------------------------

def _pair(out, a, b):
    # out = a * b / 1000 (V x A -> kW) unless the vehicle provides out itself
    o = find(out)
    if o < 0 or _src[o] >= 0:
        return
    a = find(a)
    b = find(b)
    if a >= 0 and b >= 0 and defined(a) and defined(b) and not stale(a) and not stale(b):
        set(o, get(a) * get(b) / 1000)


def tick():
    """Housekeeping, about once a second outside the CAN path: module health, derived
    metrics; drops the on-demand helper modules again. (m.freeram is ovms.health's: the
    free heap after a collection, not whatever garbage happens to be around.)"""
    g = globals()
    if "tab" in g or "io" in g:
        import ovms
        ovms.unload("metrics.tab")
        ovms.unload("metrics.io")
    try:
        set("m.monotonic", uptime() - 1)
        t = time.time()
        if time.gmtime(t)[0] >= 2024:      # the clock has been set
            set("m.time.utc", t + _EPOCH)
        # OVMS sign convention: current > 0 = discharge, so power > 0 = discharge
        _pair("v.b.power", "v.b.voltage", "v.b.current")
        _pair("v.c.power", "v.c.voltage", "v.c.current")
    except Exception as e:
        print("metrics: standard derived metrics failed:", repr(e))
    for fn in _derived:
        try:
            fn()
        except Exception as e:    # one broken derivation must not stop the others
            print("metrics: derived", getattr(fn, "__name__", "?"), "failed:", repr(e))


async def run(path=None, save_every=600):
    """Coroutine: tick() every second and save(path) at most every save_every seconds
    when a persisted metric changed. Start with asyncio.create_task(metrics.run(path))."""
    import asyncio
    last = uptime()
    while True:
        tick()
        if path and uptime() - last >= save_every and persist_due():
            try:
                __getattr__("save")(path)     # (no local: this frame lives forever)
            except OSError as e:
                print("metrics: cannot save", path, e)
            last = uptime()
        await asyncio.sleep_ms(1000)


# Build the table from the standard definitions: metrics.build fills this module's state
# (globals()) and is dropped again at once.
__import__("ovms").attr({"init": "metrics.build"}, "init", True)(globals())
