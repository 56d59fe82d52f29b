"""Config store: OVMS-style param/instance/value with a schema, secrets and atomic flash writes."""
import os
from micropython import const

from ovms.config_schema import SCHEMA

try:
    from binascii import crc32 as _crc32
except ImportError:  # port built without binascii.crc32
    _crc32 = None

# File format (text, one compact file):
#   #ovms-config 1 gen=<n>
#   param<TAB>instance<TAB>value        (\\ \t \n \r escaped)
#   #end <entries> <crc32 hex of every byte before this line>
# A file without a matching end line is incomplete or damaged and is never used.
# Save: write <cfg>.tmp, rename <cfg> -> <cfg>.bak (last-good), rename <cfg>.tmp -> <cfg>.
# Load: <cfg>, else a complete <cfg>.tmp (cut between the renames), else <cfg>.bak, else
# defaults. A damaged <cfg> is moved to <cfg>.corrupt-N (N = 1..3) and reported.

_MAGIC = b"#ovms-config 1"
_NAME = "ovms.cfg"
_MAX_ENTRIES = const(256)
_MAX_NAME = const(64)
MASK = "********"

_root = "/store"
_data = {}  # param -> {instance: canonical value string}
_gen = 0
_loaded = False
_frozen = False  # load failed unexpectedly: never write over the files
_cbs = []
_schemas = [SCHEMA]


# ---- schema -------------------------------------------------------------------------

def _find(p, i):
    # -> [param, instance, type, default, spec] of the exact schema line, or None
    for s in _schemas:
        k = s.find("\n%s %s " % (p, i))
        if k >= 0:
            f = s[k + 1:s.find("\n", k + 1)].split(" ")
            if f[1] == i:
                return f
    return None


def _spec(p, i):
    f = _find(p, i)
    if f is None and i != "*":
        f = _find(p, "*")
    return f


def _lines(param=None):
    # yields the fields of each schema line (of param only, if given)
    for s in _schemas:
        for ln in s.split("\n"):
            if ln:
                f = ln.split(" ")
                if param is None or f[0] == param:
                    yield f


def register(text):
    """Add schema lines "param instance type default spec" (e.g. from a vehicle module)."""
    for ln in text.split("\n"):
        f = ln.split(" ")
        if ln and (len(f) != 5 or f[2] not in "sSibe" or len(f[2]) != 1 or f[0][0] == "#"):
            raise ValueError("bad schema line: " + ln)
    _schemas.append("\n" + text.strip("\n") + "\n")


def _names(it, k):
    r = []
    for f in it:
        if f[k] not in r and f[k] != "*":
            r.append(f[k])
    r.sort()
    return r


def params():
    """Sorted list of parameter names (schema + any stored)."""
    _ensure()
    r = _names(_lines(), 0)
    for p in _data:
        if p not in r:
            r.append(p)
    r.sort()
    return r


def known(param):
    """Instance names the schema defines for param (free-form '*' left out)."""
    return _names(_lines(param), 1)


def freeform(param):
    """True if any instance name is accepted for param (e.g. usr, wifi.ssid)."""
    return _find(param, "*") is not None


def instances(param):
    """Sorted instance names that have a stored value for param."""
    _ensure()
    r = list(_data.get(param, ()))
    r.sort()
    return r


def secret(param, instance):
    """True if the value is write-only (never shown, listed or published)."""
    f = _spec(param, instance)
    if f is not None:
        return f[2] == "S"
    for f in _lines(param):  # unknown instance of a param that holds secrets: secret too
        if f[2] == "S":
            return True
    return False


def readable(param):
    """False for params whose values are all secret (like OVMS 'password')."""
    for f in _lines(param):
        if f[2] != "S":
            return True
    return not secret(param, "")


def describe(param, instance):
    """Human description of what a value must be, e.g. 'integer 0..65535 (default 0)'."""
    f = _spec(param, instance)
    if f is None:
        return "unknown"
    t, sp = f[2], f[4]
    if t == "S":
        return "secret text, max %s chars" % sp
    r = ("integer " + sp.replace(":", "..") if t == "i" else "yes|no" if t == "b"
         else "one of " + sp if t == "e" else "text, max %s chars" % sp)
    d = "" if f[3] == "-" else f[3]
    return r + (" (default '%s')" % d if t == "s" else " (default %s)" % d)


# ---- values -------------------------------------------------------------------------

def _canon(f, param, instance, value):
    # validate value against schema line f, return the canonical stored string
    t, sp = f[2], f[4]
    if value is None:
        raise ValueError("Missing value for %s %s" % (param, instance))
    if t == "b":
        if value is True or value is False:
            return "yes" if value else "no"
        v = str(value).strip().lower()
        if v in ("yes", "true", "1", "on", "y"):
            return "yes"
        if v in ("no", "false", "0", "off", "n"):
            return "no"
        raise ValueError("Invalid value '%s' for %s %s: expected yes or no" % (value, param, instance))
    if t == "i":
        a, b = sp.split(":")
        try:
            n = int(str(value).strip())
        except ValueError:
            n = None
        if n is None or isinstance(value, bool) or n < int(a) or n > int(b):
            raise ValueError("Invalid value '%s' for %s %s: expected an integer %s..%s"
                             % (value, param, instance, a, b))
        return str(n)
    if t == "e":
        v = str(value).strip()
        for c in sp.split("|"):
            if c.lower() == v.lower():
                return c
        raise ValueError("Invalid value '%s' for %s %s: expected one of %s" % (value, param, instance, sp))
    if not isinstance(value, str):
        value = str(value)
    if len(value) > int(sp):  # (never echo the value: it may be a secret)
        raise ValueError("Invalid value for %s %s: too long (%d > %s chars)" % (param, instance, len(value), sp))
    return value


def _lookup(param, instance):
    # -> schema line for a settable param/instance, or ValueError with a clear message
    if not known(param) and not freeform(param):
        raise ValueError("Unknown parameter '%s' (known: %s)" % (param, ", ".join(_names(_lines(), 0))))
    f = _find(param, instance) if isinstance(instance, str) and instance != "*" else None
    if f is None:
        f = _find(param, "*")
        if f is None:
            raise ValueError("Unknown instance '%s' for parameter '%s' (known: %s)"
                             % (instance, param, ", ".join(known(param))))
        if not isinstance(instance, str) or not instance or instance == "*" or len(instance) > _MAX_NAME:
            raise ValueError("Invalid instance name '%s' for %s: 1..%d chars" % (instance, param, _MAX_NAME))
        for c in "\t\n\r\x00":
            if c in instance:
                raise ValueError("Invalid instance name for %s: control characters" % param)
    return f


def check(param, instance, value):
    """Validate without storing: returns the canonical text, raises ValueError if invalid."""
    return _canon(_lookup(param, instance), param, instance, value)


def _conv(t, v):
    if t == "i":
        return int(v)
    if t == "b":
        return v == "yes"
    return v


def get(param, instance, default=None):
    """Typed value (int / bool / str). Unset (or stored value invalid): the schema default;
    `default` only for params/instances the schema does not define (free-form, unknown)."""
    _ensure()
    d = _data.get(param)
    v = d.get(instance) if d else None
    f = _spec(param, instance)
    if v is not None:
        if f is None:
            return v
        try:
            return _conv(f[2], _canon(f, param, instance, v))
        except ValueError:
            pass
    if f is None or f[1] == "*":
        return default
    return _conv(f[2], "" if f[3] == "-" else f[3])


def is_set(param, instance):
    """True if a value is stored (not just the schema default)."""
    _ensure()
    d = _data.get(param)
    return bool(d) and instance in d


def display(param, instance):
    """Value as text for showing to a user: secrets masked ('********' if set, '' if not)."""
    _ensure()
    d = _data.get(param)
    v = d.get(instance) if d else None
    if secret(param, instance):
        return MASK if v else ""
    if v is None:
        f = _spec(param, instance)
        if f is None or f[1] == "*" or f[3] == "-":
            return ""
        return f[3]
    return v


def set(param, instance, value):
    """Validate, store and persist one value; raises ValueError (clear message) if invalid."""
    update(((param, instance, value),))


def rm(param, instance):
    """Remove a stored value (instance '*' = all of param); True if anything was removed."""
    _ensure()
    d = _data.get(param)
    if not d:
        return False
    if instance == "*":
        names = list(d)
    elif instance in d:
        names = [instance]
    else:
        return False
    update([(param, i, None) for i in names])
    return True


def update(items):
    """Apply many (param, instance, value) at once (value None = remove): all or nothing,
    one flash write. Raises ValueError before changing anything if one item is invalid."""
    _ensure()
    ch = []
    n = 0
    for d in _data.values():
        n += len(d)
    for p, i, v in items:
        d = _data.get(p)
        old = d.get(i) if d else None
        if v is None:
            new = None
        else:
            new = _canon(_lookup(p, i), p, i, v)
            if old is None:
                n += 1
                if n > _MAX_ENTRIES:
                    raise ValueError("Config full (%d values): remove some first" % _MAX_ENTRIES)
        if new != old:
            ch.append((p, i, old, new))
    if not ch:
        return
    for p, i, old, new in ch:
        _put(p, i, new)
    try:
        _save()
    except Exception:
        for k in range(len(ch) - 1, -1, -1):
            p, i, old, new = ch[k]
            _put(p, i, old)
        raise
    for p, i, old, new in ch:
        _notify(p, i)


def _put(p, i, v):
    d = _data.get(p)
    if v is None:
        if d and i in d:
            del d[i]
            if not d:
                del _data[p]
    else:
        if d is None:
            d = _data[p] = {}
        d[i] = v


# ---- change notifications -------------------------------------------------------------

def on_change(cb):
    """Call cb(param, instance) after every successful set/rm (keep it short: set a flag)."""
    if cb not in _cbs:
        _cbs.append(cb)


def off_change(cb):
    if cb in _cbs:
        _cbs.remove(cb)


def _notify(p, i):
    for cb in list(_cbs):
        try:
            cb(p, i)
        except Exception as e:
            print("config: change callback failed:", repr(e))


# ---- persistence --------------------------------------------------------------------

def _crc(b, c):
    if _crc32:
        return _crc32(b, c)
    for x in b:
        c = ((c << 5) + c + x) & 0xFFFFFFFF
    return c


def _esc(s):
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def root():
    """Directory of the config store (other modules keep their state files beside it)."""
    return _root


def path(suffix=""):
    """Path of the config file (suffix '.bak' = last-good copy, '.tmp' = write in progress)."""
    return (_root if _root != "/" else "") + "/" + _NAME + suffix


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _remove(p):
    try:
        os.remove(p)
    except OSError:
        pass


def _replace(src, dst):
    try:
        os.rename(src, dst)
    except OSError:  # file systems that do not rename over an existing file
        _remove(dst)
        os.rename(src, dst)


def _write(fn, data, gen):
    with open(fn, "wb") as f:
        ln = b"%s gen=%d\n" % (_MAGIC, gen)
        c = _crc(ln, 0)
        f.write(ln)
        n = 0
        ps = list(data)
        ps.sort()
        for p in ps:
            d = data[p]
            ks = list(d)
            ks.sort()
            for i in ks:
                ln = ("%s\t%s\t%s\n" % (_esc(p), _esc(i), _esc(d[i]))).encode()
                c = _crc(ln, c)
                f.write(ln)
                n += 1
        f.write(b"#end %d %08x\n" % (n, c))


def _save():
    global _gen
    if _frozen:
        raise OSError("config store could not be loaded at boot: read-only until reboot")
    cfg = path()
    tmp = cfg + ".tmp"
    try:
        os.mkdir(_root)
    except OSError:
        pass
    _write(tmp, _data, _gen + 1)
    if _exists(cfg):
        _replace(cfg, cfg + ".bak")
    _replace(tmp, cfg)
    _gen += 1


def save():
    """Write the current values to flash now (normally done by set/rm/update)."""
    _ensure()
    _save()


def generation():
    """Counter incremented by every successful write (0 = never written)."""
    return _gen


def load():
    """(Re)load from flash; never raises. Returns warning strings to report at boot."""
    global _data, _gen, _loaded, _frozen
    import sys
    _loaded = True
    _frozen = False
    try:
        from ovms import config_recover
        w = config_recover.run()
    except Exception as e:  # (MemoryError, a broken file system...): defaults, and never
        # overwrite the files we could not read
        w, _data, _gen, _frozen = ["config: load failed (%r), booting on defaults, "
                                   "config is read-only until reboot" % (e,)], {}, 0, True
    # boot-time code: unload it again to give its RAM back
    sys.modules.pop("ovms.config_recover", None)
    try:
        import ovms
        del ovms.config_recover
    except Exception:  # (not imported: KeyError on MicroPython)
        pass
    return w


def loaded():
    """True once load() (or init()) has run in this boot."""
    return _loaded


def init(root="/store"):
    """Use root as the config directory and load from it; returns the load() warnings."""
    global _root
    _root = root.rstrip("/") or "/"
    return load()


def _ensure():
    if not _loaded:
        for m in load():
            print(m)
