"""Metric text parsing and persistence (loaded on demand through ovms.metrics)."""
import time
from micropython import const
from ovms import metrics as M

_T_FLOAT = const(0)
_T_INT = const(1)
_T_BOOL = const(2)
_T_STR = const(3)
_T_VFLOAT = const(4)
_T_VINT = const(5)
_T_DATE = const(6)
_T_TIME = const(7)
_F_TYPE = const(7)
_F_PERSIST = const(8)
_F_REST = const(64)

_MAGIC = "OVMSMETRICS 1"


def parse(t, s):
    """Value of type t (metrics.T_*) from its text form; ValueError if it is not one."""
    if t == _T_STR:
        return s
    s = s.strip()
    try:
        if t == _T_FLOAT:
            v = float(s)
            if v - v == 0:
                return v
        elif t == _T_INT:
            return M._coerce(t, float(s) if "." in s or "e" in s else int(s))
        elif t == _T_BOOL:
            s = s.lower()
            if s in ("yes", "true", "on", "1"):
                return True
            if s in ("no", "false", "off", "0"):
                return False
        elif t == _T_VFLOAT or t == _T_VINT:
            if not s:
                return []
            return [parse(t - 4, x) for x in s.split(",")]
        elif t == _T_DATE:
            if s.isdigit():
                return int(s)
            return _parse_date(s)
        elif t == _T_TIME:
            if s.isdigit():
                return M._coerce(t, int(s))
            p = [int(x) for x in s.split(":")]
            if 2 <= len(p) <= 3 and 0 <= p[0] < 24 and 0 <= p[1] < 60 and (len(p) == 2 or 0 <= p[2] < 60):
                return p[0] * 3600 + p[1] * 60 + (p[2] if len(p) == 3 else 0)
    except ValueError:
        pass
    raise ValueError("not a %s: %r" % (M.TYPE_NAMES[t], s))


def text(t, v, p=0):
    """metrics.text of a vector, date or time value v of type t (p: display precision)."""
    if t == _T_VFLOAT:
        return ",".join([M._ftext(x, p) for x in v])
    if t == _T_VINT:
        return ",".join(map(str, v))
    if t == _T_DATE:
        try:
            return "%04d-%02d-%02d %02d:%02d:%02d UTC" % time.gmtime(v - M._EPOCH)[:6]
        except (OverflowError, ValueError):
            return str(v)
    if t == _T_TIME:
        return "%02d:%02d:%02d" % (v // 3600, v // 60 % 60, v % 60)
    return str(v)


def _parse_date(s):
    # "YYYY-MM-DD[ HH:MM[:SS]][ UTC]" -> Unix seconds, independent of the port's epoch
    s = s.replace("UTC", "").replace("Z", "").replace("T", " ").strip()
    d, _, c = s.partition(" ")
    y, mo, da = [int(x) for x in d.split("-")]
    hh, mi, ss = ([int(x) for x in c.split(":")] + [0, 0, 0])[:3] if c else (0, 0, 0)
    if not (1970 <= y < 2200 and 1 <= mo <= 12 and 1 <= da <= 31 and hh < 24 and mi < 60 and ss < 61):
        raise ValueError
    yy = y - (mo <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + da - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return (era * 146097 + doe - 719468) * 86400 + hh * 3600 + mi * 60 + ss


# ---- persistence -------------------------------------------------------------------

def _crc(data, c=0):
    try:
        import binascii
        return binascii.crc32(data, c)
    except (ImportError, AttributeError):
        for b in data:
            c = (c * 31 + b) & 0xFFFFFFFF
        return c


def _ser(i):
    v = M.get(i)
    t = M._fl[i] & _F_TYPE
    if t == _T_STR:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    if t == _T_BOOL:
        return "1" if v else "0"
    if t == _T_VFLOAT or t == _T_VINT:
        return text(t, v, M._dp[i])
    if t == _T_FLOAT:
        return M._ftext(v, M._dp[i])    # the text MQTT and the shell show
    return repr(v)


def _unser(s):
    if "\\" not in s:
        return s
    out = []
    j = 0
    while j < len(s):
        c = s[j]
        if c == "\\" and j + 1 < len(s):
            j += 1
            c = {"n": "\n", "t": "\t"}.get(s[j], s[j])
        out.append(c)
        j += 1
    return "".join(out)


def save(path):
    """Write the defined persisted metrics to path atomically (temp file + rename)."""
    from ovms import fsutil
    return fsutil.write(path, _save)


def _save(f):
    n = 0
    b = (1 << M.PERSIST) ^ 0xFF
    line = _MAGIC + "\n"
    f.write(line)
    crc = _crc(line.encode())
    for i in range(M._n):
        if M._fl[i] & _F_PERSIST and M.defined(i):
            line = "%s\t%s\n" % (M.name(i), _ser(i))
            f.write(line)
            crc = _crc(line.encode(), crc)
            M._mod[i] &= b
            n += 1
    f.write("#%08x\n" % crc)
    return n


def load(path):
    """Restore persisted metrics from path; corrupt files are ignored with a message."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return 0
    try:
        data = data.decode()
        body, _, tail = data.rstrip("\n").rpartition("\n#")
        body += "\n"
        if not data.startswith(_MAGIC + "\n") or int(tail, 16) != _crc(body.encode()):
            raise ValueError("bad header or checksum")
    except (ValueError, UnicodeError) as e:
        print("metrics: ignoring corrupt", path, "(%s)" % e)
        return 0
    n = 0
    for line in body.split("\n")[1:]:
        nm, tab, v = line.partition("\t")
        i = M.find(nm) if tab else -1
        if i < 0 or not M._fl[i] & _F_PERSIST or M.defined(i):
            continue
        t = M._fl[i] & _F_TYPE
        try:
            v = M._coerce(t, _unser(v))
        except ValueError:
            print("metrics: bad saved value for", nm)
            continue
        M._store(i, t, v)
        M._fl[i] |= _F_REST
        M._mod[i] = 0xFF & ~(1 << M.PERSIST)
        n += 1
    return n
