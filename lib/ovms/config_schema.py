"""Config schema table (names follow OVMS v3), and the rarely used schema queries and edits.

ovms.config keeps what runs all the time (get, secret, display, persistence); set/rm/update,
check, describe, params, known, freeform, readable and register are here, reached through
ovms.config (config.set(...) works as before): imported for the call, not kept in RAM."""
from micropython import const

_MAX_ENTRIES = const(256)
_MAX_NAME = const(64)

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
ota pubkey s /store/ota.pub 128
ota health.deadline i 120 10:3600
usr * s - 256
"""

# (after SCHEMA: importing ovms.config reads SCHEMA from this module)
from ovms import config as c  # noqa: E402


def register(text):
    """Add schema lines "param instance type default spec" (e.g. from a vehicle module)."""
    for ln in text.split("\n"):
        f = ln.split(" ")
        if ln and (len(f) != 5 or f[2] not in "sSibe" or len(f[2]) != 1 or f[0][0] == "#"):
            raise ValueError("bad schema line: " + ln)
    c._schemas.append("\n" + text.strip("\n") + "\n")


def _names(it, k):
    r = []
    for f in it:
        if f[k] not in r and f[k] != "*":
            r.append(f[k])
    r.sort()
    return r


def params():
    """Sorted list of parameter names (schema + any stored)."""
    c._ensure()
    r = _names(c._lines(), 0)
    for p in c._data:
        if p not in r:
            r.append(p)
    r.sort()
    return r


def known(param):
    """Instance names the schema defines for param (free-form '*' left out)."""
    return _names(c._lines(param), 1)


def freeform(param):
    """True if any instance name is accepted for param (e.g. usr, wifi.ssid)."""
    return c._find(param, "*") is not None


def readable(param):
    """False for params whose values are all secret (like OVMS 'password')."""
    for f in c._lines(param):
        if f[2] != "S":
            return True
    return not c.secret(param, "")


def describe(param, instance):
    """Human description of what a value must be, e.g. 'integer 0..65535 (default 0)'."""
    f = c._spec(param, instance)
    if f is None:
        return "unknown"
    t, sp = f[2], f[4]
    if t == "S":
        return "secret text, max %s chars" % sp
    r = ("integer " + sp.replace(":", "..") if t == "i" else "yes|no" if t == "b"
         else "one of " + sp if t == "e" else "text, max %s chars" % sp)
    d = "" if f[3] == "-" else f[3]
    return r + (" (default '%s')" % d if t == "s" else " (default %s)" % d)


def _lookup(param, instance):
    # -> schema line for a settable param/instance, or ValueError with a clear message
    if not known(param) and not freeform(param):
        raise ValueError("Unknown parameter '%s' (known: %s)" % (param, ", ".join(_names(c._lines(), 0))))
    f = c._find(param, instance) if isinstance(instance, str) and instance != "*" else None
    if f is None:
        f = c._find(param, "*")
        if f is None:
            raise ValueError("Unknown instance '%s' for parameter '%s' (known: %s)"
                             % (instance, param, ", ".join(known(param))))
        if not isinstance(instance, str) or not instance or instance == "*" or len(instance) > _MAX_NAME:
            raise ValueError("Invalid instance name '%s' for %s: 1..%d chars" % (instance, param, _MAX_NAME))
        for ch in "\t\n\r\x00":
            if ch in instance:
                raise ValueError("Invalid instance name for %s: control characters" % param)
    return f


def check(param, instance, value):
    """Validate without storing: returns the canonical text, raises ValueError if invalid."""
    return c._canon(_lookup(param, instance), param, instance, value)


def set(param, instance, value):
    """Validate, store and persist one value; raises ValueError (clear message) if invalid."""
    update(((param, instance, value),))


def rm(param, instance):
    """Remove a stored value (instance '*' = all of param); True if anything was removed."""
    c._ensure()
    d = c._data.get(param)
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
    c._ensure()
    ch = []
    n = 0
    for d in c._data.values():
        n += len(d)
    for p, i, v in items:
        d = c._data.get(p)
        old = d.get(i) if d else None
        if v is None:
            new = None
        else:
            new = c._canon(_lookup(p, i), p, i, v)
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
        c._save()
    except Exception:
        for k in range(len(ch) - 1, -1, -1):
            p, i, old, new = ch[k]
            _put(p, i, old)
        raise
    for p, i, old, new in ch:
        c._notify(p, i)


def _put(p, i, v):
    d = c._data.get(p)
    if v is None:
        if d and i in d:
            del d[i]
            if not d:
                del c._data[p]
    else:
        if d is None:
            d = c._data[p] = {}
        d[i] = v


def save():
    """Write the current values to flash now (normally done by set/rm/update)."""
    c._ensure()
    c._save()
