"""Metric table building and rarely used accessors (loaded on demand through ovms.metrics;
bytecode only: native code could not be freed when the module is dropped again)."""
import array
from micropython import const
import ovms
from ovms import metrics as M

# The table builder (needed at import, so ovms.metrics loads it alone, without this module):
# loaded for a call and dropped again.
_BUILD = {"*": "metrics.build"}

# Value types (low 3 bits of the flag byte); TYPES holds their definition letters.
T_FLOAT = const(0)
T_INT = const(1)
T_BOOL = const(2)
T_STR = const(3)
T_VFLOAT = const(4)
T_VINT = const(5)
T_DATE = const(6)
T_TIME = const(7)
TYPES = "fibsvwDT"              # (as metrics.build.TYPES)
TYPE_NAMES = ("float", "int", "bool", "string", "float vector", "int vector", "date", "time")
# unit labels (unit_code() adds new ones here and to metrics._units); a definition's unit
# letter indexes UNIT_CHARS
UNITS = M._units.split("\n")
UNIT_CHARS = "-%kVAWECHcsmSMdpgrnwah"   # (as metrics.build.UNIT_CHARS)

_F_TYPE = const(7)
_F_PERSIST = const(8)
_F_PRIO = const(16)
_F_DEF = const(32)
_F_REST = const(64)
_F_LOCAL = const(128)
_NOSLOT = const(0xFFFF)
_EXT = const(0x8000)


def init(defs=None):
    """(Re)build the table from the definitions string (default: metrics.defs.DEFS)."""
    ovms.attr(_BUILD, "init", True)(M.__dict__, defs)


_init = init


def drop():
    """Release all table storage (for measurements and tests)."""
    ovms.attr(_BUILD, "drop", True)(M.__dict__)


def reserve(n):
    """Make room for n more metrics in one step (the arrays stay the same objects)."""
    k = M._n + n - len(M._fl)       # (the capacity: every per-metric array has that length)
    if k <= 0:
        return
    for a in (M._fl, M._sp, M._dp, M._mod):
        a.extend(bytearray(k))
    for a in (M._noff, M._order):
        a.extend(array.array("H", bytearray(2 * k)))
    M._tupd.extend(array.array("i", bytearray(4 * k)))
    M._src.extend(array.array("h", b"\xff\xff" * k))
    M._slot.extend(array.array("H", b"\xff\xff" * k))


def _add(off, nm, fl, st):
    i = M._n
    if i >= len(M._fl):
        reserve(16)
    M._noff[i] = off
    M._fl[i] = fl
    M._sp[i] = st & 0xFF
    M._dp[i] = st >> 8
    M._src[i] = -1
    M._slot[i] = _NOSLOT
    M._tupd[i] = 0
    M._mod[i] = 0
    # keep _order sorted by name (definitions usually arrive sorted: append)
    order = M._order
    pos = M._vfind(order, M._noff, i, M._std, M._ext, nm, len(nm)) & 0xFFFF
    j = i
    while j > pos:
        order[j] = order[j - 1]
        j -= 1
    order[pos] = i
    M._n = i + 1
    return i


def _check_name(s):
    if not isinstance(s, str) or not 0 < len(s) < 64:
        raise ValueError("bad metric name: %r" % (s,))
    for c in s.encode():        # (bytes: iterating the str would intern every letter)
        if not (97 <= c <= 122 or 65 <= c <= 90 or 48 <= c <= 57 or c in b"._-"):
            raise ValueError("bad metric name: %r" % (s,))


def define(s, type="f", unit="", stale=0, persist=False, priority=False):
    """Add a metric (vehicle x<code>.*, module metrics); returns its index.

    type: a letter of TYPES or a T_* constant; unit: label; stale: seconds (0 = never).
    An existing metric of that name is returned unchanged."""
    i = M.find(s)
    if i >= 0:
        return i
    _check_name(s)
    t = type if isinstance(type, int) else TYPES.find(type) if len(type) == 1 else -1
    if not 0 <= t <= 7:
        raise ValueError("bad metric type: %r" % (type,))
    u = unit_code(unit)
    st = stale_class(stale)
    o = len(M._ext) + 1
    if o + len(s) >= _EXT:
        raise ValueError("metric name table full")
    M._ext.append(u)                # the unit index, then the name and "\n"
    M._ext.extend(s)                # (a str is a buffer: no temporary bytes)
    M._ext.append(10)
    return _add(o | _EXT, s, t | (_F_PERSIST if persist else 0) | (_F_PRIO if priority else 0), st)


def unit_code(label):
    """Index of a unit label in metrics.UNITS (added if new)."""
    label = label or ""
    if label in UNITS:
        return UNITS.index(label)
    if len(UNITS) >= 255 or "\n" in label:
        raise ValueError("too many units" if "\n" not in label else "bad unit: %r" % label)
    UNITS.append(label)
    M._units += "\n" + label
    return len(UNITS) - 1


def stale_class(sec):
    """Index of a staleness timeout (seconds) in the table of timeouts (added if new)."""
    sec = int(sec or 0)
    if not 0 <= sec <= 65535:
        raise ValueError("stale timeout out of range: %d" % sec)
    stt = M._stt
    if sec in stt:
        return stt.index(sec)
    if len(stt) >= 16:
        raise ValueError("too many distinct stale timeouts")
    stt.append(sec)
    return len(stt) - 1


def match(pattern="*"):
    """Iterator of metric indexes (in name order) whose name starts with pattern.

    "v.b", "v.b.*" and "v.b*" all mean that prefix; "*" or "" is every metric."""
    p = pattern.strip() if pattern else ""
    while p.endswith("*"):
        p = p[:-1]
    lp = len(p)
    pos = M._vfind(M._order, M._noff, M._n, M._std, M._ext, p, lp) & 0xFFFF if lp else 0
    while pos < M._n:
        i = M._order[pos]
        if lp:
            o = M._noff[i]
            if o & _EXT:
                ok = M._vpfx(M._ext, o & 0x7FFF, p, lp)
            else:
                ok = M._vpfx(M._std, o, p, lp)
            if not ok:
                return
        yield i
        pos += 1


def attach(decoder):
    """Take CAN-bound values from decoder.value(k) (see bind)."""
    detach()
    M._dec = decoder


def detach():
    """Forget the decoder; the last decoded values stay as local values."""
    if M._dec is not None:
        for i in range(M._n):
            if M._src[i] >= 0:
                v = M.get(i) if M._tupd[i] else None   # keep the last decoded value
                M._src[i] = -1
                M._fl[i] &= ~_F_LOCAL
                if v is not None:
                    M._store(i, M._fl[i] & _F_TYPE, v)
    for i in range(M._n):
        M._src[i] = -1
    M._ovr.clear()
    M._xlat.clear()
    M._dec = None


def bind(m, k, mapping=None):
    """Metric m takes its value from decoder signal k (mapping: {physical: value} or a
    valid (low, high) range)."""
    i = M._idx(m)
    M._src[i] = k
    if isinstance(mapping, dict) and mapping:
        t = M._fl[i] & _F_TYPE
        x = {}
        for a, b in mapping.items():
            if isinstance(a, str):
                try:
                    a = float(a)
                except ValueError:
                    x[a] = None if b is None else M._coerce(t, b)      # a VAL_ label
                    continue
            x[int(a) if a == int(a) else a] = None if b is None else M._coerce(t, b)
        M._xlat[i] = x
    elif isinstance(mapping, (tuple, list)) and len(mapping) == 2:
        M._xlat[i] = (float(mapping[0]), float(mapping[1]))      # valid range
    elif mapping:
        raise ValueError("mapping must be a dict or (low, high)")
    else:
        M._xlat.pop(i, None)


def configure(m, stale=None, deadband=None, min_interval=None, persist=None, priority=None):
    """Change the staleness timeout (s), publish deadband / min_interval (s) or flags."""
    i = M._idx(m)
    sp = M._sp[i]
    if stale is not None:
        sp = (sp & 0xF0) | stale_class(stale)
    if deadband is not None or min_interval is not None:
        p = sp >> 4
        db = float(M._pdb[p] if deadband is None else deadband)
        mi = int(M._pmi[p] if min_interval is None else min_interval)
        if not db >= 0 or mi < 0:
            raise ValueError("deadband and min_interval must be >= 0")
        for p in range(len(M._pdb)):
            if M._pdb[p] == db and M._pmi[p] == mi:
                break
        else:
            if len(M._pdb) >= 16:
                raise ValueError("too many distinct publish policies")
            M._pdb.append(db)
            M._pmi.append(mi)
            p = len(M._pdb) - 1
        sp = (sp & 15) | (p << 4)
    M._sp[i] = sp
    f = M._fl[i]
    if persist is not None:
        f = (f | _F_PERSIST) if persist else (f & ~_F_PERSIST)
    if priority is not None:
        f = (f | _F_PRIO) if priority else (f & ~_F_PRIO)
    M._fl[i] = f


# ---- rarely used accessors -----------------------------------------------------------

def unit(i):
    """OVMS unit label of metric i ("" if none)."""
    o = M._noff[M._idx(i)]
    if o & _EXT:
        u = M._ext[(o & 0x7FFF) - 1]
    else:   # the unit letter of its definition line
        std = M._std
        k = std.rfind("\n", 0, o) + 3
        u = UNIT_CHARS.find(std[k:k + 1])
    return UNITS[u]


def precision(m, decimals=-1):
    """Display decimals of metric m (None: up to 6 significant digits, as OVMS); with
    decimals (0..9, or None for the default) sets them first."""
    i = M._idx(m)
    if decimals != -1:
        if decimals is not None and not (isinstance(decimals, int) and 0 <= decimals <= 9):
            raise ValueError("precision must be 0..9 decimals")
        M._dp[i] = 0 if decimals is None else decimals + 1
    p = M._dp[i]
    return p - 1 if p else None


def priority(i):
    """True if changes of metric i should be published at once."""
    return bool(M._fl[M._idx(i)] & _F_PRIO)


def mark_all(consumer):
    """Set the change bit of every defined metric for consumer (full republish)."""
    b = 1 << consumer
    for i in range(M._n):
        if M._tupd[i] or M._fl[i] & _F_DEF:
            M._mod[i] |= b


def tables():
    """(mod, tupd): the change-bit bytearray and update-time array('i') for the decoder."""
    return M._mod, M._tupd


def derive(fn):
    """Register fn() to run on every tick() (derived metrics)."""
    if fn not in M._derived:
        M._derived.append(fn)



def stale_timeout(i):
    """Seconds without update after which metric i is stale (0 = never)."""
    return M._stt[M._sp[M._idx(i)] & 15]


def persisted(i):
    """True if metric i survives a reboot (see save/load)."""
    return bool(M._fl[M._idx(i)] & _F_PERSIST)


def source(m):
    """Decoder signal index feeding metric m, or -1 (value set from Python)."""
    return M._src[M._idx(m)] if M._dec is not None else -1


def restored(m):
    """True if the value was restored from before the reboot and not updated since."""
    i = M._rd(m)
    if i < 0:
        return False
    return not M._tupd[i] and bool(M._fl[i] & _F_REST)


def fresh(m):
    """Defined, updated this boot and not stale (OVMS IsFresh)."""
    i = M._rd(m)
    if i < 0:
        return False
    return bool(M._tupd[i]) and not M.stale(i)


def touch(m):
    """Refresh the update time of a Python-set metric without changing its value."""
    i = M._idx(m)
    if (M._src[i] < 0 or M._dec is None) and M._fl[i] & _F_DEF:
        M._tupd[i] = M.uptime()
        M._fl[i] &= ~_F_REST


def clear(m):
    """Make a metric undefined again (a retained MQTT value is not touched)."""
    i = M._idx(m)
    M._fl[i] &= ~(_F_DEF | _F_REST | _F_LOCAL)
    M._tupd[i] = 0
    M._obj.pop(i, None)
    M._ovr.pop(i, None)


def modified(m, consumer):
    """Peek at the change bit of a metric for a consumer (not cleared)."""
    return bool(M._mod[M._idx(m)] & (1 << consumer))


def mark(m, consumer=None):
    """Set the change bit of one metric for one consumer (or all)."""
    i = M._idx(m)
    M._mod[i] |= 0xFF if consumer is None else 1 << consumer


def clear_all(consumer):
    """Clear every change bit of consumer."""
    b = (1 << consumer) ^ 0xFF
    for i in range(M._n):
        M._mod[i] &= b
