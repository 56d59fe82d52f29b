"""Home Assistant MQTT discovery: the module as one device, an entity per metric (on demand)."""
import json
from ovms import config, metrics

# Entities (one retained config each, abbreviated keys, compact JSON) under
# <ha prefix>/<component>/<node>/<object>/config; state_topic = the metric's own OVMS topic.
# After a connect, and when metrics got their first value, the entities that are new or
# differ from the last announcement (a CRC per config, kept in <store>/ha.disc) are sent;
# all of them when Home Assistant announces itself (<ha prefix>/status = online); after a
# connect, entities no longer there get an empty retained config (removed).

_BIN = {   # yes/no metrics -> binary_sensor device class (payload on = "yes")
    "v.c.charging": "battery_charging", "v.c.pilot": "plug", "v.e.on": "power",
    "v.e.awake": "running", "v.e.headlights": "light", "v.e.alarm": "safety",
    "v.e.charging12v": "battery_charging", "v.e.heating": "heat", "v.e.cooling": "cold",
    "v.b.12v.voltage.alert": "problem", "s.v3.connected": "connectivity",
}
# unit label -> (device class or "", state class or "", HA unit)
_UNIT = {
    "%": ("", "measurement", "%"), "V": ("voltage", "measurement", "V"),
    "A": ("current", "measurement", "A"), "kW": ("power", "measurement", "kW"),
    "W": ("power", "measurement", "W"), "kWh": ("energy", "total_increasing", "kWh"),
    "\u00b0C": ("temperature", "measurement", "\u00b0C"), "Ah": ("", "measurement", "Ah"),
    "km": ("distance", "measurement", "km"), "km/h": ("speed", "measurement", "km/h"),
    "m": ("distance", "measurement", "m"), "Sec": ("duration", "measurement", "s"),
    "Min": ("duration", "measurement", "min"), "Hour": ("duration", "measurement", "h"),
    "dBm": ("signal_strength", "measurement", "dBm"), "kPa": ("pressure", "measurement", "kPa"),
    "\u00b0": ("", "measurement", "\u00b0"), "rpm": ("", "measurement", "rpm"),
    "Nm": ("", "measurement", "Nm"), "Wh/km": ("", "measurement", "Wh/km"),
    "m/s\u00b2": ("", "measurement", "m/s\u00b2"),
}
_TOTAL = ("v.p.odometer", "v.b.energy.used.total", "v.b.energy.recd.total",
          "v.b.coulomb.used.total", "v.b.coulomb.recd.total", "m.monotonic")
# vehicle command -> (shell command HA sends, button label); a command with a value (limit):
# a number entity sending "<shell command> <value>", range from the vehicle's definition
_COMMANDS = (("lock", "lock", "Lock"), ("unlock", "unlock", "Unlock"),
             ("climatecontrol.on", "climatecontrol on", "Climate on"),
             ("climatecontrol.off", "climatecontrol off", "Climate off"),
             ("charge.start", "charge start", "Start charging"),
             ("charge.stop", "charge stop", "Stop charging"))
_NUMBERS = (("charge.limit", "charge limit", "Charge limit", "%", "v.c.limit.soc"),
            ("charge.current", "charge current", "Charge current", "A", "v.c.climit"))


def _clean(s):
    b = bytearray()
    for c in s.encode():
        b.append(c if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c in b"_-") else 95)
    return b.decode()


def node_id():
    return _clean("ovms_" + (config.get("vehicle", "id") or "module")).lower()


def _device():
    v = metrics.get("m.version")
    serial = metrics.get("m.serial") or config.get("vehicle", "id") or "module"
    veh = None
    try:
        from ovms.can import vehicle
        veh = vehicle.current()
    except Exception:
        pass
    d = {"ids": [_clean("micro-ovms-" + serial)],
         "name": config.get("vehicle", "id") or "micro-ovms", "mf": "micro-ovms",
         "mdl": veh.name if veh else "OVMS module"}
    if v:
        d["sw"] = v
    return d, veh


def _metric_entity(i, p, node, avty):
    """(component, object id, config) for metric i, or None for a metric not to announce."""
    n = metrics.name(i)
    t = metrics.typecode(i)
    if t in "vw":
        return None         # vectors (cell voltages): their text outgrows HA's 255-char state
    obj = _clean(n.replace(".", "_"))
    c = {"name": n, "uniq_id": node + "_" + obj, "stat_t": p + "metric/" + n.replace(".", "/")}
    if n[:2] in ("m.", "s."):
        c["ent_cat"] = "diagnostic"
    if n != "s.v3.connected":
        c["avty"] = avty + [{"t": p + "metric/s/v3/stale",
                             "val_tpl": "{{'offline' if ',%s,' in value else 'online'}}" % n}]
        c["avty_mode"] = "all"
    if t == "b":
        c["pl_on"], c["pl_off"] = "yes", "no"
        if n == "v.e.locked":
            c["dev_cla"] = "lock"       # Home Assistant's lock class: on means unlocked
            c["pl_on"], c["pl_off"] = "no", "yes"
        elif n[:4] == "v.d.":
            c["dev_cla"] = "door"
        elif n in _BIN:
            c["dev_cla"] = _BIN[n]
        return "binary_sensor", obj, c
    if t == "D":
        c["dev_cla"] = "timestamp"      # "2023-12-03 02:14:31 UTC" -> ISO 8601
        c["val_tpl"] = "{{value[:10]~'T'~value[11:19]~'+00:00'}}"
        return "sensor", obj, c
    if t in "fi":
        u = metrics.unit(i)
        dc, sc, hu = _UNIT.get(u, ("", "measurement", u))
        if n == "v.b.soc":
            dc = "battery"
        if n in _TOTAL:
            sc = "total_increasing"
        if dc:
            c["dev_cla"] = dc
        if sc:
            c["stat_cla"] = sc
        if hu:
            c["unit_of_meas"] = hu
    return "sensor", obj, c


def entities(p, hap):
    """Every entity to announce, one at a time: (topic, payload) (a generator: one payload
    in RAM at a time, ~0.5 KB)."""
    node = node_id()
    dev, veh = _device()
    avty = [{"t": p + "metric/s/v3/connected", "pl_avail": "yes", "pl_not_avail": "no"}]
    for i in range(metrics.count()):
        if not metrics.defined(i):
            continue
        e = _metric_entity(i, p, node, avty)
        if e:
            e[2]["dev"] = dev
            yield "%s/%s/%s/%s/config" % (hap, e[0], node, e[1]), _json(e[2])
            dev = {"ids": dev["ids"]}   # the full device once; the others refer to it
    if metrics.defined("v.p.latitude") and metrics.defined("v.p.longitude"):
        # a position (GPS): a device tracker fed by the small JSON the server publishes on
        # <prefix>ha/position with every position it sends (Home Assistant wants both in one)
        c = {"name": "Position", "uniq_id": node + "_position",
             "json_attr_t": p + "ha/position", "src_type": "gps", "avty": avty, "dev": dev}
        yield "%s/device_tracker/%s/position/config" % (hap, node), _json(c)
    cmds = veh and getattr(veh, "_cmds", None) or {}
    for cmd, text, label in _COMMANDS:
        if cmd in cmds:
            obj = _clean("cmd_" + text.replace(" ", "_"))
            c = {"name": label, "uniq_id": node + "_" + obj,
                 "cmd_t": p + "client/homeassistant/command/" + obj, "pl_prs": text,
                 "avty": avty, "dev": dev}
            yield "%s/button/%s/%s/config" % (hap, node, obj), _json(c)
            dev = {"ids": dev["ids"]}
    for cmd, text, label, unit, metric in _NUMBERS:
        rng = _param_range(cmds.get(cmd))
        if rng:
            obj = _clean("cmd_" + text.replace(" ", "_"))
            c = {"name": label, "uniq_id": node + "_" + obj,
                 "cmd_t": p + "client/homeassistant/command/" + obj,
                 "cmd_tpl": text + " {{ value | int }}", "min": rng[0], "max": rng[1],
                 "step": 1, "unit_of_meas": unit, "mode": "box", "avty": avty, "dev": dev}
            if metrics.defined(metric):     # the car reports the setting: shown as the state
                c["stat_t"] = p + "metric/" + metric.replace(".", "/")
            yield "%s/number/%s/%s/config" % (hap, node, obj), _json(c)
            dev = {"ids": dev["ids"]}


def _json(c):
    # compact JSON: no spaces after separators (a few hundred bytes per connect)
    return json.dumps(c, separators=(",", ":"))


def _param_range(spec):
    """(min, max) of a command's first argument as integers, or None (no such command or
    no argument): from the vehicle definition's frames (bus, id, ext, data, params)."""
    from math import ceil, floor
    for f in spec or ():
        for prm in f[4]:
            if prm[8] == 0:
                return ceil(prm[6]), floor(prm[7])
    return None


def _state_path():
    return config.root().rstrip("/") + "/ha.disc"


def _load():
    # {topic: payload CRC} of what was announced, from lines "<crc> <topic>"
    old = {}
    try:
        with open(_state_path()) as f:
            for ln in f:
                c, _, t = ln.strip().partition(" ")
                if t:
                    old[t] = c
    except (OSError, ValueError):
        pass
    return old


async def publish(client, p, force=False, prune=True):
    """Announce the entities that are new or changed since the last announcement (all with
    force); with prune, remove those no longer there (after a connect; a run for metrics
    that got their first value only adds). Returns (published, removed, bytes)."""
    from binascii import crc32
    hap = config.get("server.v3", "ha.prefix") or "homeassistant"
    on = config.get("server.v3", "ha.discovery")
    old = _load()
    now = {}
    n = 0
    sent = 0
    changed = 0
    if on:
        for t, pl in entities(p, hap):
            c = "%08x" % crc32(pl)
            now[t] = c
            if old.get(t) != c:
                changed += 1
            elif not force:
                continue
            await client.publish(t, pl, retain=True)
            n += 1
            sent += len(t) + len(pl)
    gone = [t for t in old if t not in now]
    if prune:
        for t in gone:
            await client.publish(t, "", retain=True)
    else:
        for t in gone:
            now[t] = old[t]
        gone = []
    if changed or gone:     # the flash file only when something changed
        from ovms.fsutil import write

        def save(f):
            for t, c in now.items():
                f.write(c)
                f.write(" ")
                f.write(t)
                f.write("\n")
        write(_state_path(), save)
    return n, len(gone), sent
