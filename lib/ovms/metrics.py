"""Metric table: one preallocated, array-backed store of OVMS-style metrics."""
import array
import time
import micropython
from micropython import const

# Consumers: one change bit each in a per-metric byte (bits 4..7 are free for others).
MQTT = const(0)
SHELL = const(1)
HA = const(2)
PERSIST = const(3)

# Value types (low 3 bits of the flag byte); TYPES holds their definition letters.
T_FLOAT = const(0)
T_INT = const(1)
T_BOOL = const(2)
T_STR = const(3)
T_VFLOAT = const(4)
T_VINT = const(5)
T_DATE = const(6)     # int, Unix seconds, shown as "YYYY-MM-DD HH:MM:SS UTC"
T_TIME = const(7)     # int, seconds of the day, shown as "HH:MM:SS"
TYPES = "fibsvwDT"
TYPE_NAMES = ("float", "int", "bool", "string", "float vector", "int vector", "date", "time")

# Unit labels (native OVMS units); a definition's unit letter indexes UNIT_CHARS.
UNITS = ["", "%", "km", "V", "A", "kW", "kWh", "\u00b0C", "Ah", "Wh/km", "km/h", "m",
         "Sec", "Min", "dBm", "kPa", "\u00b0", "rpm", "Nm", "W", "m/s\u00b2", "Hour"]
UNIT_CHARS = "-%kVAWECHcsmSMdpgrnwah"

# Flag byte bits (same values in metrics_tab / metrics_io).
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

# Table storage (built by metrics_tab.init; one entry per metric unless noted):
#   _std/_ext name blobs, _noff/_nlen name offset+length, _order indexes sorted by name,
#   _fl flags+type, _unit unit index, _sp stale class | policy << 4, _src decoder signal
#   or -1, _slot index into _val (numbers set from Python) or _NOSLOT, _tupd uptime of
#   the last update (0 = never), _mod change bits; dicts _obj (str/list values),
#   _ovr (overrides of CAN values), _xlat (CAN value maps).
_n = 0
_dec = None


@micropython.viper
def _vcmp(a: ptr8, x: int, b: ptr8, lb: int) -> int:
    # compare a[x >> 8 : (x >> 8) + (x & 255)] with b[0:lb] like strcmp
    o = x >> 8
    la = x & 255
    i = 0
    while i < la and i < lb:
        c = int(a[o + i]) - int(b[i])
        if c != 0:
            return c
        i += 1
    return la - lb


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


def _cmpi(i, s):
    o = _noff[i]
    if o & _EXT:
        return _vcmp(_ext, ((o & 0x7FFF) << 8) | _nlen[i], s, len(s))
    return _vcmp(_std, (o << 8) | _nlen[i], s, len(s))


def _lower(s):
    # first position in _order whose name is >= s
    lo = 0
    hi = _n
    while lo < hi:
        mid = (lo + hi) >> 1
        if _cmpi(_order[mid], s) < 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


def count():
    """Number of metrics in the table."""
    return _n


def find(s):
    """Index of the metric called s, or -1."""
    if not isinstance(s, str):
        return -1
    p = _lower(s)
    if p < _n and _cmpi(_order[p], s) == 0:
        return _order[p]
    return -1


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
        return str(_ext[o:o + _nlen[i]], "ascii")
    return _std[o:o + _nlen[i]]


def unit(i):
    """OVMS unit label of metric i ("" if none)."""
    return UNITS[_unit[_idx(i)]]


def typecode(i):
    """Type letter of metric i (one of TYPES)."""
    return TYPES[_fl[_idx(i)] & _F_TYPE]


def stale_timeout(i):
    """Seconds without update after which metric i is stale (0 = never)."""
    return _stt[_sp[_idx(i)] & 15]


def deadband(i):
    """Smallest change worth publishing for metric i (0 = any change)."""
    return _pdb[_sp[_idx(i)] >> 4]


def min_interval(i):
    """Minimum seconds between two publications of metric i (0 = none)."""
    return _pmi[_sp[_idx(i)] >> 4]


def priority(i):
    """True if changes of metric i should be published at once."""
    return bool(_fl[_idx(i)] & _F_PRIO)


def persisted(i):
    """True if metric i survives a reboot (see save/load)."""
    return bool(_fl[_idx(i)] & _F_PERSIST)


def source(m):
    """Decoder signal index feeding metric m, or -1 (value set from Python)."""
    return _src[_idx(m)] if _dec is not None else -1


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

def _num(x):
    return x == x and x - x == 0


def _coerce(t, v):
    if isinstance(v, str):
        return _io().parse(t, v)
    if t == T_FLOAT:
        if isinstance(v, (int, float, bool)) and _num(v):
            return float(v)
    elif t == T_BOOL:
        if isinstance(v, (int, bool)):
            return bool(v)
    elif t == T_INT or t == T_DATE or t == T_TIME:
        if isinstance(v, float) and _num(v):
            v = round(v)
        if isinstance(v, (int, bool)):
            v = int(v)
            if -_MAXI < v < _MAXI and (t != T_TIME or 0 <= v < 86400):
                return v
            raise ValueError("value out of range: %d" % v)
    elif t == T_VFLOAT or t == T_VINT:
        if isinstance(v, (list, tuple)):
            return [_coerce(t - 4, x) for x in v]
    raise ValueError("%s is not a %s value" % (type(v).__name__, TYPE_NAMES[t]))


def _dv(i, k):
    # decoder value of signal k for metric i: VAL_ labels only for strings and value maps
    return _dec.value(k, (_fl[i] & _F_TYPE) == T_STR or i in _xlat)


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
        return v if t == T_STR else None
    if t == T_FLOAT:
        return float(v)
    if t == T_BOOL:
        return v != 0
    if t == T_STR:
        return _ftext(v)
    return round(v)


def _local(i):
    f = _fl[i]
    if not f & _F_DEF:
        return None
    t = f & _F_TYPE
    if t == T_STR or t == T_VFLOAT or t == T_VINT:
        v = _obj.get(i)
        return list(v) if isinstance(v, list) else v
    v = _val[_slot[i]]
    if t == T_FLOAT:
        return v
    if t == T_BOOL:
        return v != 0
    return int(v)


def get(m):
    """Value of a metric (float/int/bool/str/list); None if never set or no such name."""
    i = _rd(m)
    if i < 0:
        return None
    k = _src[i]
    if k >= 0 and _dec is not None and _tupd[i]:
        v = _dv(i, k)
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
    if t == T_STR or t == T_VFLOAT or t == T_VINT:
        changed = not (f & _F_DEF) or _obj.get(i) != v
        _obj[i] = v
    else:
        s = _slot[i]
        if s == _NOSLOT:
            s = len(_val)
            _val.append(0.0)
            _slot[i] = s
        changed = not (f & _F_DEF) or _val[s] != v
        _val[s] = v
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
    if _src[i] >= 0 and _dec is not None:
        # overrides the decoded value until the vehicle reports a different one
        old = get(i)
        _store(i, t, v)
        _ovr[i] = _dv(i, _src[i])
        _fl[i] = (_fl[i] | _F_LOCAL) & ~_F_REST
        changed = old != v
    else:
        changed = _store(i, t, v) or bool(f & _F_REST)
        _fl[i] &= ~_F_REST
    _tupd[i] = uptime()
    if changed:
        _mod[i] = 0xFF
    return changed


def clear(m):
    """Make a metric undefined again (a retained MQTT value is not touched)."""
    i = _idx(m)
    _fl[i] &= ~(_F_DEF | _F_REST | _F_LOCAL)
    _tupd[i] = 0
    _obj.pop(i, None)
    _ovr.pop(i, None)


def touch(m):
    """Refresh the update time of a Python-set metric without changing its value."""
    i = _idx(m)
    if (_src[i] < 0 or _dec is None) and _fl[i] & _F_DEF:
        _tupd[i] = uptime()
        _fl[i] &= ~_F_REST


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


def restored(m):
    """True if the value was restored from before the reboot and not updated since."""
    i = _rd(m)
    if i < 0:
        return False
    return not _tupd[i] and bool(_fl[i] & _F_REST)


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


def fresh(m):
    """Defined, updated this boot and not stale (OVMS IsFresh)."""
    i = _rd(m)
    if i < 0:
        return False
    return bool(_tupd[i]) and not stale(i)


def _ftext(v):
    r = repr(v)
    if r.endswith(".0"):
        r = r[:-2]
    return "0" if r == "-0" else r


def text(m):
    """OVMS payload text: yes/no, full-precision floats, a,b,c vectors, "" if unset."""
    i = _rd(m)
    if i < 0:
        return ""
    v = get(i)
    if v is None:
        return ""
    t = _fl[i] & _F_TYPE
    if t == T_STR:
        return v
    if v is True or v is False:
        return "yes" if v else "no"
    if isinstance(v, float):
        return _ftext(v)
    if t == T_VFLOAT:
        return ",".join([_ftext(x) for x in v])
    if t == T_VINT:
        return ",".join([str(x) for x in v])
    if t == T_DATE:
        try:
            return "%04d-%02d-%02d %02d:%02d:%02d UTC" % time.gmtime(v - _EPOCH)[:6]
        except (OverflowError, ValueError):
            return str(v)
    if t == T_TIME:
        return "%02d:%02d:%02d" % (v // 3600, v // 60 % 60, v % 60)
    return str(v)


# ---- change tracking -------------------------------------------------------------

def next_modified(consumer, start=0, priority_only=False):
    """Next index >= start whose change bit for consumer is set (cleared on return), or -1."""
    return _vscan(_mod, _fl, start if start > 0 else 0,
                  (_n << 16) | (0x100 if priority_only else 0) | (1 << consumer))


def modified(m, consumer):
    """Peek at the change bit of a metric for a consumer (not cleared)."""
    return bool(_mod[_idx(m)] & (1 << consumer))


def mark(m, consumer=None):
    """Set the change bit of one metric for one consumer (or all)."""
    i = _idx(m)
    _mod[i] |= 0xFF if consumer is None else 1 << consumer


def mark_all(consumer):
    """Set the change bit of every defined metric for consumer (full republish)."""
    b = 1 << consumer
    for i in range(_n):
        if _tupd[i] or _fl[i] & _F_DEF:
            _mod[i] |= b


def clear_all(consumer):
    """Clear every change bit of consumer."""
    b = (1 << consumer) ^ 0xFF
    for i in range(_n):
        _mod[i] &= b


def tables():
    """(mod, tupd): the change-bit bytearray and update-time array('i') for the decoder."""
    return _mod, _tupd


# ---- in metrics_tab / metrics_io (kept apart: less RAM to compile each) ----------

def _tab():
    from ovms import metrics_tab
    return metrics_tab


def _io():
    from ovms import metrics_io
    return metrics_io


def define(s, type="f", unit="", stale=0, persist=False, priority=False):
    """Add a metric (vehicle x<code>.*, module metrics); returns its index.

    type: a letter of TYPES or a T_* constant; unit: label; stale: seconds (0 = never).
    An existing metric of that name is returned unchanged."""
    return _tab().define(s, type, unit, stale, persist, priority)


def reserve(n):
    """Make room for n more metrics in one step (before defining many)."""
    _tab().reserve(n)


def unit_code(label):
    """Index of a unit label in UNITS (added if new)."""
    return _tab().unit_code(label)


def match(pattern="*"):
    """Iterator of metric indexes (in name order) whose name starts with pattern.

    "v.b", "v.b.*" and "v.b*" all mean that prefix; "*" or "" is every metric."""
    return _tab().match(pattern)


def attach(decoder):
    """Take CAN-bound values from decoder.value(k) (see bind)."""
    _tab().attach(decoder)


def detach():
    """Forget the decoder; the last decoded values stay as local values."""
    _tab().detach()


def bind(m, k, mapping=None):
    """Metric m takes its value from decoder signal k (mapping: {physical: value})."""
    _tab().bind(m, k, mapping)


def configure(m, stale=None, deadband=None, min_interval=None, persist=None, priority=None):
    """Change the staleness timeout (s), publish deadband / min_interval (s) or flags."""
    _io().configure(m, stale, deadband, min_interval, persist, priority)


def save(path):
    """Write the defined persisted metrics to path atomically; returns how many."""
    return _io().save(path)


def load(path):
    """Restore persisted metrics saved before a reboot (defined, not fresh); returns
    how many. A missing file restores nothing; a corrupt one is ignored with a message."""
    return _io().load(path)


def persist_due():
    """True if a persisted metric changed since the last save()."""
    return _io().persist_due()


def run(path=None, save_every=600):
    """Coroutine: tick() every second and save(path) at most every save_every seconds
    when a persisted metric changed. Start with asyncio.create_task(metrics.run(path))."""
    return _io().run(path, save_every)


def derive(fn):
    """Register fn() to run on every tick() (derived metrics)."""
    if fn not in _derived:
        _derived.append(fn)


def tick():
    """Housekeeping, about once a second outside the CAN path: derived metrics."""
    for fn in [_io().derive_std] + _derived:
        try:
            fn()
        except Exception as e:    # one broken derivation must not stop the others
            print("metrics: derived", getattr(fn, "__name__", "?"), "failed:", repr(e))


def _init(defs=None):
    """(Re)build the table from the standard definitions, dropping everything else."""
    _tab().init(defs)


_init()
