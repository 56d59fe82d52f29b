"""Vehicle: load a generated vehicle module, bind its CAN signals to metrics, build command frames."""
import array
import sys
from ovms import metrics

_cur = None


def _infer(flags):
    # metric type letter for a vehicle metric from decoder info flags
    if flags & 0xFF == 1:
        return "b"
    if flags & 0x400:       # VAL_ labels
        return "s"
    if flags & 0x4000:      # integral metric value
        return "i"
    return "f"


def _put(b, pos, n, be, raw):
    # write n bits of raw into frame b at a DBC bit position (be: Motorola, pos = LSB)
    for j in range(n):
        if be:
            e = pos - j
            i = e >> 3
            m = 1 << (7 - (e & 7))
        else:
            p = pos + j
            i = p >> 3
            m = 1 << (p & 7)
        if (raw >> j) & 1:
            b[i] |= m
        else:
            b[i] &= ~m & 0xFF


class Vehicle:
    """A loaded vehicle: decoder, bound metrics, derived metrics and command frames."""

    def __init__(self, mod):
        from ovms.can.decoder import Decoder
        self.code = mod.CODE
        self.name = getattr(mod, "NAME", mod.CODE)
        self.buses = dict(getattr(mod, "BUSES", {"can0": 500000}))
        self._cmds = getattr(mod, "COMMANDS", {})
        self.poll = getattr(mod, "POLL", ())   # diagnostic poll list (ovms.poll.poller)
        d = Decoder(mod.TABLE)
        self.decoder = d
        n = d.nsignals
        opts = {}
        for row in getattr(mod, "METRICS", ()):
            opts[row[0]] = row
        derived = getattr(mod, "DERIVED", ())
        new = 0             # metrics to add (a signal feeding two new metrics counts twice)
        for k in range(n):
            nm = d.info(k)[2]
            if nm and metrics.find(nm) < 0:
                new += 1
        for row in derived:
            if metrics.find(row[0]) < 0:
                new += 1
        metrics.reserve(new)
        metrics.attach(d)
        tg = array.array("H", b"\xff\xff" * max(n, 1))
        for k in range(n):
            inf = d.info(k)
            nm = inf[2]
            if not nm:
                continue
            o = opts.get(nm)
            i = metrics.find(nm)
            if i < 0:
                fl = o[4] if o else ""
                i = metrics.define(nm, (o[1] if o and o[1] else _infer(inf[4])),
                                   o[2] if o and o[2] is not None else inf[3],
                                   o[3] if o and o[3] is not None else 120, "P" in fl, "!" in fl)
            elif o:
                metrics.configure(i, stale=o[3], persist=True if "P" in o[4] else None,
                                  priority=True if "!" in o[4] else None)
            if o and (o[5] is not None or o[6] is not None):
                metrics.configure(i, deadband=o[5], min_interval=o[6])
            metrics.bind(i, k, o[7] if o else None)
            if o and len(o) > 8:
                metrics.precision(i, o[8])     # display decimals (from the DBC resolution)
            tg[k] = i
        mod_, tupd = metrics.tables()
        d.bind(mod_, tupd, tg)
        self._derived = []      # (metric, op, scale, input metric, ...)
        for row in derived:
            nm, op, ins, scale, t, unit, stale = row[:7]
            i = metrics.define(nm, t, unit or "", stale or 0)
            if len(row) > 7 and row[7] is not None:
                metrics.precision(i, row[7])
            self._derived.append((i, op, scale) + tuple(map(metrics.find, ins)))
        self._fn = None
        if self._derived:
            self._fn = self._derive
            metrics.derive(self._fn)
        metrics.set("v.type", self.code)

    def _derive(self):
        for d in self._derived:
            op = d[1]
            r = 0 if op != "mul" else 1
            for k in range(3, len(d)):
                j = d[k]
                v = metrics.get(j) if j >= 0 and not metrics.stale(j) else None
                if v is None or isinstance(v, (str, list)):
                    r = None
                    break
                r = r * v if op == "mul" else r + v
            if r is not None:
                if op == "mean":
                    r = r / (len(d) - 3)
                scale = d[2]
                metrics.set(d[0], r * scale if scale != 1 else r)

    def ids(self, bus):
        """[(frame id, extended)] the vehicle decodes on bus index 0..3 ("can0" = 0)."""
        d = self.decoder
        out = []
        for i in range(d.nmessages):
            b, ext, fid = d.msg_info(i)[:3]
            if b == bus:
                out.append((fid, ext))
        return out

    def bitrate(self, bus):
        """Bit rate of bus index 0..3 (500 kbit/s unless the definition says otherwise)."""
        return self.buses.get("can%d" % bus, 500000)

    def commands(self):
        """Names of the commands this vehicle supports ("lock", "charge.limit", ...)."""
        c = list(self._cmds)
        c.sort()
        return c

    def command_frames(self, name, args=()):
        """[(bus 1..4, id, extended, data)] for a command, None if the vehicle has none.

        Raises ValueError with a message for missing or out-of-range arguments."""
        spec = self._cmds.get(name)
        if not spec:
            return None
        out = []
        for bus, fid, ext, data, params in spec:
            if params:
                b = bytearray(data)
                for pos, ln, be, scale, off, signed, lo, hi, ai in params:
                    if ai >= len(args):
                        raise ValueError("%s needs %d argument(s)" % (name, ai + 1))
                    try:
                        v = float(args[ai])
                    except (TypeError, ValueError):
                        raise ValueError("%s: %r is not a number" % (name, args[ai]))
                    if not lo <= v <= hi:
                        raise ValueError("%s: %s is out of range %s..%s" % (
                            name, args[ai], metrics._ftext(lo), metrics._ftext(hi)))
                    raw = round((v - off) / scale)
                    if raw < 0:
                        raw += 1 << ln
                    _put(b, pos, ln, be, raw)
                data = bytes(b)
            out.append((bus + 1, fid, bool(ext), data))
        return out

    def unload(self):
        """Unbind from the metric table (metrics keep their last values)."""
        metrics.detach()
        try:
            metrics._derived.remove(self._fn)
        except ValueError:
            pass
        self._derived = []


def load(what):
    """Load a vehicle by code ("KN": module veh_kn on sys.path) or from a module object;
    replaces the current vehicle. Raises ImportError/ValueError with a message."""
    global _cur
    if isinstance(what, str):
        name = "veh_" + what.lower()
        try:
            mod = __import__(name)
        except ImportError:
            raise ImportError("vehicle %s: module %s not found" % (what, name))
    else:
        mod = what
        name = None
    unload()
    try:
        v = Vehicle(mod)
    except Exception:
        metrics.detach()        # no half-bound vehicle
        raise
    if name:
        sys.modules.pop(name, None)       # options and tables are copied or kept by the decoder
    _cur = v
    return v


def current():
    """The loaded Vehicle, or None."""
    return _cur


def unload():
    """Unload the current vehicle (if any)."""
    global _cur
    if _cur is not None:
        _cur.unload()
        _cur = None
