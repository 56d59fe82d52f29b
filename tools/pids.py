#!/usr/bin/env python3
"""Vehicle profiles from the public PID databases (WiCAN vehicle_profiles, ABRP ev-obd-pids).

    pids.py import --format wican|abrp PROFILE.json --code CODE -o DIR
                   [--mapping MAP.json] [--skip-unsupported] [--merge] [--name NAME]
    pids.py check PROFILE.json --format wican|abrp --log candump.log [--code CODE] [--mapping MAP.json]

import writes DIR/vehicle.json (a poll list, format in firmware/vehicles/README.md, with the
profile's expressions compiled for the device by tools/pidexpr.py) and DIR/README.md naming
the source; `make vehicles`, the virtual device and deploy take DIR like any other vehicle.
--merge adds the poll list to an existing vehicle.json in DIR (its DBC metrics kept).

Names: parameters with an OVMS meaning become the standard metric (SOC v.b.soc, SOH v.b.soh,
HV_V v.b.voltage, HV_A v.b.current, LV_V v.b.12v.voltage, ODOMETER v.p.odometer, SPEED
v.p.speed; ABRP soc, soh, voltage, current, batt_temp, ext_temp, odometer, speed,
is_charging); the rest x<code>.<name> (lower case, `_` and spaces as dots: HV_C_V_MAX ->
x<code>.hv.c.v.max). A mapping file {"NAME": "metric" | {"metric": ..., "type": "b"} | null}
overrides both (null: leave the parameter out).

Request and answer ids: WiCAN's `ATSH` (init or pid_init) gives the request id, `ATCRA` the
answer id, else request id + 8 for 11-bit ids (the 29-bit physical ids swapped); `ATSP` 6/8
(11-bit) or 7/9 (29-bit, 8/9 at 250 kbit/s); `ATCP` the 29-bit priority. ABRP's `ecu` is the
answer id (3 hex digits 11-bit, 6 with the priority in front, 8 a full 29-bit id), the
`ATSH` in force before the command the request id. A WiCAN pid of odd length ends in the
ELM327 answer-count digit, which is dropped; ABRP raw frames after ATCAF0 lose their PCI byte
and padding.

check decodes a candump -L log: requests on a profile's request ids and the ISO-TP answers on
its answer ids (single, first and consecutive frames reassembled), each value printed."""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pidexpr  # noqa: E402

NAMES = {
    "wican": {"SOC": "v.b.soc", "SOH": "v.b.soh", "HV_V": "v.b.voltage", "HV_A": "v.b.current",
              "LV_V": "v.b.12v.voltage", "ODOMETER": "v.p.odometer", "SPEED": "v.p.speed"},
    "abrp": {"soc": "v.b.soc", "soh": "v.b.soh", "voltage": "v.b.voltage", "current": "v.b.current",
             "batt_temp": "v.b.temp", "ext_temp": "v.e.temp", "odometer": "v.p.odometer",
             "speed": "v.p.speed", "is_charging": "v.c.charging"},
}
# polled while the bus has traffic (an OBD-only vehicle has no other sign of life), faster
# when a broadcast or another source says the car is awake, on or charging
INTERVAL = {"off": 60, "awake": 30, "on": 10, "charging": 10}


class ProfileError(Exception):
    """A profile that cannot be imported (the message names the file and the entry)."""


def metric_name(code, name):
    """x<code>.<name>: lower case, `_`, spaces and other separators as dots."""
    n = re.sub(r"[^a-z0-9]+", ".", name.lower()).strip(".")
    if not n:
        raise ProfileError("parameter name %r gives no metric name" % name)
    return "x%s.%s" % (code.lower(), n)


# ---- ELM327 state (headers, filters, protocol) ---------------------------------------------

class Elm:
    def __init__(self):
        self.ext = False
        self.rate = 500000
        self.tx = None
        self.rx = None
        self.prio = 0x18
        self.caf = True

    def copy(self):
        e = Elm()
        e.__dict__.update(self.__dict__)
        return e

    def at(self, cmd):
        """Apply an AT command (others are ignored); False if it is not an AT command."""
        c = cmd.replace(" ", "").upper()
        if not c.startswith("AT"):
            return False
        c = c[2:]
        m = re.fullmatch(r"SPA?([0-9A-C])", c)
        if m:
            p = int(m.group(1), 16)
            if p in (6, 7, 8, 9):
                self.ext = p in (7, 9)
                self.rate = 500000 if p in (6, 7) else 250000
            return True
        m = re.fullmatch(r"SH([0-9A-F]{3}|[0-9A-F]{6}|[0-9A-F]{8})", c)
        if m:
            h = m.group(1)
            self.tx = (int(h, 16), len(h) > 3, len(h))
            return True
        m = re.fullmatch(r"CRA([0-9A-F]{3}|[0-9A-F]{8})", c)
        if m:
            self.rx = int(m.group(1), 16)
            return True
        m = re.fullmatch(r"CP([0-9A-F]{1,2})", c)
        if m:
            self.prio = int(m.group(1), 16)
            return True
        m = re.fullmatch(r"CAF([01])", c)
        if m:
            self.caf = m.group(1) == "1"
        return True

    def ids(self, rx=None):
        """(tx, rx, ext) for a request in this state; rx: an answer id the profile names."""
        tx = None
        ext = self.ext
        if self.tx:
            v, e, n = self.tx
            tx = (self.prio << 24 | v) if n == 6 else v
            ext = e
        if rx is None:
            rx = self.rx
        if rx is not None and rx > 0x7FF:
            if not ext and tx is not None:
                tx = None                   # an 11-bit header with a 29-bit answer: derive it
            ext = True
        if tx is None and rx is not None:
            tx = _swap(rx) if rx > 0x7FF else rx - 8
        if tx is None:
            tx = 0x7DF if not ext else 0x18DB33F1
        if rx is None:
            rx = (_swap(tx) if ext else tx + 8) if tx not in (0x7DF, 0x18DB33F1) else 0
        return tx, rx, ext


def _swap(i):
    return (i & 0x1FFF0000) | (i & 0xFF) << 8 | (i >> 8 & 0xFF)


def _cmds(s):
    if isinstance(s, str):
        return [c.strip() for c in s.split(";") if c.strip()]
    if isinstance(s, dict):
        s = s.get("command", [])
    return [c.strip() for c in s if isinstance(c, str) and c.strip()]


# ---- reading the two formats -------------------------------------------------------------

def _load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ProfileError("%s: cannot read: %s" % (path, e))


def _find_base(path, rel):
    d = os.path.dirname(os.path.abspath(path))
    for _ in range(4):
        p = os.path.join(d, rel)
        if os.path.exists(p):
            return p
        d = os.path.dirname(d)
    raise ProfileError("%s: extends %r: file not found next to it or above" % (path, rel))


def load_wican(path, seen=()):
    """A WiCAN profile with its `extends` chain resolved (the child's keys win)."""
    p = _load(path)
    if not isinstance(p, dict):
        raise ProfileError("%s: a WiCAN profile is a JSON object" % path)
    if "extends" in p:
        base = _find_base(path, p["extends"])
        if os.path.abspath(base) in seen:
            raise ProfileError("%s: extends loops back to %s" % (path, base))
        b = load_wican(base, seen + (os.path.abspath(path),))
        b.update({k: v for k, v in p.items() if k != "extends"})
        p = b
    return p


def _params(plist, where):
    """WiCAN parameters: {name: expr} or [{name, expression, unit, class, min, max}]."""
    if isinstance(plist, dict):
        return [(n, e, {}) for n, e in plist.items()]
    if isinstance(plist, list):
        out = []
        for k, x in enumerate(plist):
            if not isinstance(x, dict) or "name" not in x or not ("expression" in x or "expr" in x):
                raise ProfileError("%s: parameter %d needs a name and an expression" % (where, k))
            out.append((x["name"], x.get("expression", x.get("expr")), x))
        return out
    raise ProfileError("%s: parameters must be an object or a list" % where)


def requests_wican(p, path):
    """[(where, (tx, rx, ext), rate, request bytes, [(name, expr, info)])]."""
    st = Elm()
    for c in _cmds(p.get("init", "")):
        st.at(c)
    pids = p.get("pids")
    if not isinstance(pids, list) or not pids:
        raise ProfileError("%s: no pids" % path)
    out = []
    for k, e in enumerate(pids):
        where = "%s: pids[%d]" % (path, k)
        if not isinstance(e, dict) or "pid" not in e:
            raise ProfileError("%s: needs a pid" % where)
        s = st.copy()
        for c in _cmds(e.get("pid_init", "")):
            s.at(c)
        pid = str(e["pid"]).replace(" ", "")
        if len(pid) % 2:
            pid = pid[:-1]              # the ELM327 answer-count digit
        try:
            req = bytes.fromhex(pid)
        except ValueError:
            raise ProfileError("%s: pid %r is not hex" % (where, e["pid"]))
        if not req:
            raise ProfileError("%s: empty pid" % where)
        out.append((where + " (%s)" % pid.upper(), s.ids(), s.rate, req,
                    _params(e.get("parameters", {}), where)))
    return out


def requests_abrp(p, path):
    if not isinstance(p, dict):
        raise ProfileError("%s: an ABRP profile is a JSON object" % path)
    st = Elm()
    for c in _cmds(p.get("init_commands", [])):
        st.at(c)
    states = {}
    for c in _cmds(p.get("data_commands", [])):
        if not st.at(c):
            states.setdefault(c.replace(" ", "").upper(), st.copy())
    groups = {}
    for name, v in p.items():
        if not isinstance(v, dict) or "equation" not in v:
            continue
        where = "%s: %s" % (path, name)
        cmd = str(v.get("command", "")).replace(" ", "").upper()
        s = states.get(cmd, st)
        try:
            req = bytes.fromhex(cmd)
        except ValueError:
            raise ProfileError("%s: command %r is not hex" % (where, v.get("command")))
        if not s.caf and req and 1 <= req[0] <= 7 and len(req) > req[0]:
            req = req[1:1 + req[0]]     # a raw frame (ATCAF0): PCI byte, then the request
        if not req:
            raise ProfileError("%s: no command" % where)
        ecu = str(v.get("ecu", "") or "").strip().upper()
        rx = None
        if ecu:
            if not re.fullmatch(r"[0-9A-F]{3}|[0-9A-F]{6}|[0-9A-F]{8}", ecu):
                raise ProfileError("%s: ecu %r is not a CAN id" % (where, ecu))
            rx = int(ecu, 16) | (s.prio << 24 if len(ecu) == 6 else 0)
        info = {"min": v.get("minValue"), "max": v.get("maxValue"),
                "bool": str(v.get("type", "")).lower() == "boolean"}
        key = (s.ids(rx), req)
        groups.setdefault(key, (where, s.rate, []))[2].append((name, v["equation"], info))
    if not groups:
        raise ProfileError("%s: no values (entries with an \"equation\")" % path)
    return [("%s (%s)" % (w, req.hex().upper()), ids, rate, req, params)
            for (ids, req), (w, rate, params) in groups.items()]


def requests(fmt, path):
    if fmt == "wican":
        p = load_wican(path)
        return p, requests_wican(p, path)
    p = _load(path)
    return p, requests_abrp(p, path)


# ---- building the vehicle ------------------------------------------------------------------

def _number(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def poll_list(fmt, reqs, code, mapping=None, skip=False, warn=print):
    """Profile requests -> (poll list for vehicle.json, bitrate)."""
    mapping = mapping or {}
    names = NAMES[fmt]
    used = {}
    out = []
    rate = None
    for where, (tx, rx, ext), r, req, params in reqs:
        rate = rate or r
        vals = {}
        for name, text, info in params:
            w = "%s: parameter %s" % (where, name)
            m = mapping.get(name, names.get(name)) if name in mapping else names.get(name)
            typ = "b" if info.get("bool") else None
            if name in mapping and mapping[name] is None:
                continue
            if isinstance(m, dict):
                typ = m.get("type", typ)
                m = m.get("metric")
            m = m or metric_name(code, name)
            try:
                pidexpr.compile_expr(text, fmt)
                if typ is None and pidexpr.parse(text, fmt)[0] == "bit":
                    typ = "b"           # a single bit: a yes/no metric
            except pidexpr.ExprError as e:
                if not skip:
                    raise ProfileError("%s: %s (expression %r)" % (w, e, text))
                warn("warning: %s skipped: %s (expression %r)" % (w, e, text))
                continue
            if m in used:
                warn("warning: %s: %s already comes from %s; this one is left out" % (w, m, used[m]))
                continue
            used[m] = w
            v = {"expr": text, "dialect": fmt}
            if typ and not m.startswith("v."):
                v["type"] = typ
            lo, hi = _number(info.get("min")), _number(info.get("max"))
            if lo is not None and hi is not None and lo <= hi:
                v["valid"] = [lo, hi]
            if info.get("unit"):
                v["unit"] = info["unit"]
            vals[m] = v
        if not vals:
            continue
        e = {"bus": "can0", "tx": "%X" % tx, "request": req.hex().upper(), "interval": dict(INTERVAL),
             "values": vals}
        e["rx"] = "%X" % rx if rx else "functional"
        if ext:
            e["ext"] = True
        out.append(e)
    if not out:
        raise ProfileError("no value could be imported")
    return out, rate or 500000


def import_profile(fmt, path, code, outdir, mapping=None, skip=False, merge=False, name=None,
                   warn=print):
    if not re.fullmatch(r"[A-Z][A-Z0-9]{1,7}", code or ""):
        raise ProfileError('--code must be 2..8 upper-case letters/digits, e.g. "KN"')
    p, reqs = requests(fmt, path)
    poll, rate = poll_list(fmt, reqs, code, mapping, skip, warn)
    os.makedirs(outdir, exist_ok=True)
    vj = os.path.join(outdir, "vehicle.json")
    src = os.path.basename(path)
    if merge:
        v = _load(vj)
        if v.get("vehicle") != code:
            raise ProfileError("%s is vehicle %s, not %s" % (vj, v.get("vehicle"), code))
        with open(vj, encoding="utf-8") as f:
            text = f.read().rstrip()
        if "poll" not in v and text.endswith("}"):
            # keep the hand-written layout: the poll list goes in before the closing brace
            text = text[:-1].rstrip() + ',\n  "poll": ' + json.dumps(poll, indent=2).replace(
                "\n", "\n  ") + "\n}\n"
            with open(vj, "w", encoding="utf-8") as f:
                f.write(text)
            v["poll"] = poll
            return v
        v["poll"] = poll
    else:
        title = name or p.get("car_model") or "%s (imported from %s)" % (code, src)
        v = {"vehicle": code, "name": title,
             "comment": "imported by tools/pids.py from %s (%s format)" % (src, fmt),
             "buses": {}, "bitrate": {"can0": rate}, "metrics": {}, "poll": poll}
        with open(os.path.join(outdir, "README.md"), "w") as f:
            f.write("# %s\n\nPoll list imported with `tools/pids.py import --format %s %s --code %s`.\n"
                    "Source: %s (%s). Keep the profile's licence and attribution with it.\n"
                    % (title, fmt, src, code, src, "WiCAN vehicle_profiles, GPL-3.0" if fmt == "wican"
                       else "ABRP ev-obd-pids, Apache-2.0"))
    with open(vj, "w") as f:
        json.dump(v, f, indent=1)
        f.write("\n")
    return v


# ---- checking a profile against a capture --------------------------------------------------

def _frames(log):
    rx = re.compile(r"\(([\d.]+)\)\s+(\S+)\s+([0-9A-Fa-f]+)#([0-9A-Fa-f]*)")
    with open(log) as f:
        for ln in f:
            m = rx.match(ln.strip())
            if m:
                yield float(m.group(1)), m.group(2), int(m.group(3), 16), bytes.fromhex(m.group(4))


def check(fmt, path, log, code="X", mapping=None, out=print):
    """Decode the profile's answers in a candump -L log; returns the number of values printed."""
    _, reqs = requests(fmt, path)
    by_rx = {}
    for where, (tx, rx, ext), _, req, params in reqs:
        trees = []
        for name, text, _ in params:
            try:
                trees.append((name, pidexpr.parse(text, fmt)))
            except pidexpr.ExprError as e:
                out("# %s: %s: %s" % (where, name, e))
        by_rx.setdefault(rx, []).append((tx, req, trees))
    asm = {}            # rx id -> [expected length, bytes so far]
    shown = 0
    for t, bus, fid, data in _frames(log):
        if fid not in by_rx or not data:
            continue
        pci = data[0] >> 4
        if pci == 0:
            payload = data[1:1 + (data[0] & 0xF)]
        elif pci == 1:
            asm[fid] = [(data[0] & 0xF) << 8 | data[1], bytearray(data[2:])]
            continue
        elif pci == 2 and fid in asm:
            a = asm[fid]
            a[1] += data[1:]
            if len(a[1]) < a[0]:
                continue
            payload = bytes(a[1][:a[0]])
            del asm[fid]
        else:
            continue
        for tx, req, trees in by_rx[fid]:
            if len(payload) < len(req) or payload[0] != req[0] + 0x40 or payload[1:len(req)] != req[1:]:
                continue
            for name, tree in trees:
                v = pidexpr.evaluate(tree, payload, len(req), fmt)
                out("%.3f %s %03X %s %s = %s" % (t, bus, fid, req.hex().upper(), name,
                                                  "-" if v is None else ("%.6g" % v)))
                shown += 1
    return shown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("import", help="a profile -> a vehicle directory")
    im.add_argument("profile")
    im.add_argument("--format", required=True, choices=pidexpr.DIALECTS)
    im.add_argument("--code", required=True)
    im.add_argument("-o", "--out", required=True)
    im.add_argument("--mapping")
    im.add_argument("--name")
    im.add_argument("--skip-unsupported", action="store_true")
    im.add_argument("--merge", action="store_true", help="add the poll list to DIR/vehicle.json")
    ck = sub.add_parser("check", help="decode a profile's answers in a candump -L log")
    ck.add_argument("profile")
    ck.add_argument("--format", required=True, choices=pidexpr.DIALECTS)
    ck.add_argument("--log", required=True)
    a = ap.parse_args(argv)

    def warn(msg):
        print(msg, file=sys.stderr)
    try:
        if a.cmd == "import":
            mapping = _load(a.mapping) if a.mapping else None
            v = import_profile(a.format, a.profile, a.code.upper(), a.out, mapping, a.skip_unsupported,
                               a.merge, a.name, warn)
            n = sum(len(e["values"]) for e in v["poll"])
            print("%s: %d requests, %d values -> %s" % (a.code.upper(), len(v["poll"]), n,
                                                          os.path.join(a.out, "vehicle.json")))
        else:
            if check(a.format, a.profile, a.log) == 0:
                print("no answers to this profile's requests in %s" % a.log, file=sys.stderr)
                return 1
    except (ProfileError, OSError) as e:
        print("pids: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
