"""Config store: OVMS-style param/instance/value with a schema, secrets and atomic flash writes."""
import os

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
MASK = "********"

_root = "/store"
_data = {}  # param -> {instance: canonical value string}
_gen = 0
_loaded = False
_frozen = False  # load failed unexpectedly: never write over the files
_cbs = []
# Deferred saves: the app sets _later to a callable that wakes its saver task; a change is in
# effect at once and written soon after, off the command path (app._config_saver).
_later = None
_dirty = False


# config.<name> not found here: the rarely used API (set, rm, update, check, describe,
# params, known, freeform, readable, register, save) in config.schema, imported for the
# call and dropped again (the function keeps what it needs while it is used)
_attrs = {"*": "config.schema"}


def __getattr__(a):
    import ovms
    return ovms.attr(_attrs, a, True)


# One entry per line: "param instance type default spec"
#   type: s = string, S = secret string (write-only), i = integer, b = bool (yes/no),
#         e = enum
#   default: "-" = empty string
#   spec: s/S = max length, i = min:max, e = choice|choice|..., b = "-"
#   instance "*" = free-form instance names (any name is accepted for that param)
# Kept as one string (not a dict of tuples) to keep RAM small; looked up with str.find.
SCHEMA = """
vehicle id s - 32
vehicle type s - 16
vehicle name s - 32
vehicle timezone s UTC0 64
vehicle units.distance e K K|M
vehicle units.temp e C C|F
vehicle can.mode e listen listen|normal
vehicle can.bitrate i 500000 10000:1000000
vehicle minsoc i 0 0:100
vehicle poll e auto auto|off|obd
server.v3 server s - 128
server.v3 port i 0 0:65535
server.v3 tls b yes -
server.v3 user s - 64
server.v3 clientid s - 64
server.v3 topic.prefix s - 96
server.v3 ca s /store/ca.pem 128
server.v3 updatetime.on i 5 1:3600
server.v3 updatetime.charging i 10 1:3600
server.v3 updatetime.connected i 10 1:3600
server.v3 updatetime.awake i 60 1:86400
server.v3 updatetime.idle i 600 1:86400
server.v3 updatetime.sendall i 0 0:86400
server.v3 updatetime.keepalive i 120 10:3600
server.v3 updatetime.priority b no -
server.v3 updatetime.immediately b no -
server.v3 metrics.include s - 256
server.v3 metrics.exclude s - 256
server.v3 metrics.priority s - 256
server.v3 metrics.include.immediately s - 256
server.v3 metrics.exclude.immediately s - 256
server.v3 queue.sendall i 100 1:1000
server.v3 queue.modified i 150 1:1000
server.v3 events.legacy_topic b yes -
server.v3 retain.depth.limit b no -
server.v3 conn.stable_wait i 10 3:600
server.v3 conn.jitter.max i 5 0:60
server.v3 shell.readonly b no -
server.v3 shell.timeout i 300 0:86400
server.v3 commands e trusted trusted|signed
server.v3 ha.discovery b yes -
gps enabled b no -
gps uart i 2 1:2
gps rx i 16 0:48
gps tx i -1 -1:48
gps baud i 9600 1200:921600
gps deadband i 10 0:10000
gps flatbed i 500 0:100000
location * s - 64
server.v3 ha.prefix s homeassistant 64
password module S - 64
password server.v3 S - 128
wifi.ssid * S - 64
wifi.ap * S - 64
auto init b yes -
auto server.v3 b yes -
auto wifi.mode e client off|client|ap|apclient
auto wifi.ssid.client s - 32
module watchdog.timeout i 60 0:3600
module safemode.crashes i 3 1:20
module hostname s - 32
poll buffer i 1024 8:4095
poll timeout i 1000 50:10000
poll gap i 10 0:1000
poll bs i 8 0:255
poll stmin i 0 0:127
poll pad e AA none|00|55|AA|CC|FF
poll sleep i 10 1:3600
poll 12v.min i 120 0:160
ota health.deadline i 120 10:3600
usr * s - 256
"""
_schemas = [SCHEMA]     # the built-in table, then those register() adds


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
        if v == "yes" or v == "no":
            return v
        if v in "true 1 on y".split():
            return "yes"
        if v in "false 0 off n".split():
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


def is_set(param, instance):
    """True if a value is stored (not just the schema default)."""
    _ensure()
    d = _data.get(param)
    return bool(d) and instance in d


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


def _emit(f, data, gen):
    """Write the file's lines to f (the end line with the checksum last)."""
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


def _commit():
    """Persist a change: now, or (deferred) by the app's saver task soon."""
    global _dirty
    if _later is None or _frozen:
        _save()
    else:
        _dirty = True
        _later()


def flush():
    """Write a deferred change now (before a reset, or when the app stops)."""
    if _dirty:
        _save()


def _save():
    global _gen, _dirty
    if _frozen:
        raise OSError("config store could not be loaded at boot: read-only until reboot")
    _dirty = False
    cfg = path()
    tmp = cfg + ".tmp"
    try:
        os.mkdir(_root)
    except OSError:
        pass
    with open(tmp, "wb") as f:
        _emit(f, _data, _gen + 1)
    from ovms.fsutil import replace
    if _exists(cfg):
        replace(cfg, cfg + ".bak")
    replace(tmp, cfg)
    _gen += 1


def generation():
    """Counter incremented by every successful write (0 = never written)."""
    return _gen


def load():
    """(Re)load from flash; never raises. Returns warning strings to report at boot."""
    global _data, _gen, _loaded, _frozen
    _loaded = True
    _frozen = False
    import ovms
    try:
        w = ovms.load("config.recover").run()
    except Exception as e:  # (MemoryError, a broken file system...): defaults, and never
        # overwrite the files we could not read
        w, _data, _gen, _frozen = ["config: load failed (%r), booting on defaults, "
                                   "config is read-only until reboot" % (e,)], {}, 0, True
    # boot-time code: unload it again to give its RAM back
    ovms.unload("config.recover")
    ovms.unload("config.schema")
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
