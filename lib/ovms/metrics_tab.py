"""Metric table building: standard definitions, adding metrics, name matching, decoder binding."""
import array
import micropython
from micropython import const
from ovms import metrics as M

_F_TYPE = const(7)
_F_PERSIST = const(8)
_F_PRIO = const(16)
_F_LOCAL = const(128)
_NOSLOT = const(0xFFFF)
_EXT = const(0x8000)


@micropython.viper
def _vpfx(a: ptr8, x: int, b: ptr8, lb: int) -> int:
    # 1 if a[x >> 8 : (x >> 8) + (x & 255)] starts with b[0:lb]
    o = x >> 8
    if (x & 255) < lb:
        return 0
    i = 0
    while i < lb:
        if a[o + i] != b[i]:
            return 0
        i += 1
    return 1


def init(defs=None):
    """(Re)build the table from the definitions string (default: metric_defs.DEFS)."""
    if defs is None:
        from ovms import metric_defs
        defs = metric_defs.DEFS
    drop()
    n = defs.count("\n") + 8
    M._std = defs
    M._ext = bytearray()
    M._noff = array.array("H", bytearray(2 * n))
    M._nlen = bytearray(n)
    M._order = array.array("H", bytearray(2 * n))
    M._fl = bytearray(n)
    M._unit = bytearray(n)
    M._sp = bytearray(n)
    M._src = array.array("h", b"\xff\xff" * n)
    M._slot = array.array("H", b"\xff\xff" * n)
    M._val = array.array("d")
    M._tupd = array.array("i", bytearray(4 * n))
    M._mod = bytearray(n)
    M._obj = {}
    M._ovr = {}
    M._xlat = {}
    M._stt = [0, 10, 120, 3600, 65535]
    M._pdb = [0.0]
    M._pmi = [0]
    M._dec = None
    M._derived = []
    M._up_s = 0
    M._up_rem = 0
    M._up_last = M._ms()
    M._cap = n
    p = 0
    end = len(defs)
    tch = M.TYPES
    uch = M.UNIT_CHARS
    while p < end:
        e = defs.find("\n", p)
        if e < 0:
            e = end
        sp = defs.find(" ", p, e)
        if sp > p + 2 and defs[p] != "#":
            fl = tch.find(defs[p])
            st = ord(defs[p + 1]) - 48
            u = uch.find(defs[p + 2])
            if fl < 0 or u < 0 or not 0 <= st <= 4:
                raise ValueError("bad metric definition at %d" % p)
            for q in range(p + 3, sp):
                c = defs[q]
                if c == "P":
                    fl |= _F_PERSIST
                elif c == "!":
                    fl |= _F_PRIO
            _add(sp + 1, e - sp - 1, fl, u, st)
        p = e + 1


def drop():
    """Release all table storage (for measurements and tests)."""
    M._n = M._cap = 0
    M._std = ""
    for a in ("_ext", "_noff", "_nlen", "_order", "_fl", "_unit", "_sp", "_src", "_slot",
              "_val", "_tupd", "_mod", "_obj", "_ovr", "_xlat", "_dec"):
        setattr(M, a, None)


def reserve(n):
    """Make room for n more metrics in one step (the arrays stay the same objects)."""
    k = M._n + n - M._cap
    if k <= 0:
        return
    for a in (M._fl, M._unit, M._sp, M._mod, M._nlen):
        a.extend(bytearray(k))
    for a in (M._noff, M._order):
        a.extend(array.array("H", bytearray(2 * k)))
    M._tupd.extend(array.array("i", bytearray(4 * k)))
    M._src.extend(array.array("h", b"\xff\xff" * k))
    M._slot.extend(array.array("H", b"\xff\xff" * k))
    M._cap += k


def _add(off, ln, fl, u, st):
    i = M._n
    if i >= M._cap:
        reserve(16)
    M._noff[i] = off
    M._nlen[i] = ln
    M._fl[i] = fl
    M._unit[i] = u
    M._sp[i] = st
    M._src[i] = -1
    M._slot[i] = _NOSLOT
    M._tupd[i] = 0
    M._mod[i] = 0
    # keep _order sorted by name (definitions usually arrive sorted: append)
    nm = M.name(i)
    order = M._order
    if i == 0 or M._cmpi(order[i - 1], nm) < 0:
        pos = i
    else:
        pos = M._lower(nm)
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
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "._-"):
            raise ValueError("bad metric name: %r" % (s,))


def define(s, type="f", unit="", stale=0, persist=False, priority=False):
    i = M.find(s)
    if i >= 0:
        return i
    _check_name(s)
    t = type if isinstance(type, int) else M.TYPES.find(type) if len(type) == 1 else -1
    if not 0 <= t <= 7:
        raise ValueError("bad metric type: %r" % (type,))
    u = unit_code(unit)
    st = stale_class(stale)
    o = len(M._ext)
    if o + len(s) >= _EXT:
        raise ValueError("metric name table full")
    M._ext.extend(s.encode())
    return _add(o | _EXT, len(s), t | (_F_PERSIST if persist else 0) | (_F_PRIO if priority else 0), u, st)


def unit_code(label):
    units = M.UNITS
    label = label or ""
    if label in units:
        return units.index(label)
    if len(units) >= 255:
        raise ValueError("too many units")
    units.append(label)
    return len(units) - 1


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
    p = pattern.strip() if pattern else ""
    while p.endswith("*"):
        p = p[:-1]
    pos = M._lower(p) if p else 0
    lp = len(p)
    while pos < M._n:
        i = M._order[pos]
        if lp:
            o = M._noff[i]
            if o & _EXT:
                ok = _vpfx(M._ext, ((o & 0x7FFF) << 8) | M._nlen[i], p, lp)
            else:
                ok = _vpfx(M._std, (o << 8) | M._nlen[i], p, lp)
            if not ok:
                return
        yield i
        pos += 1


def attach(decoder):
    detach()
    M._dec = decoder


def detach():
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
