"""Shell commands: location add|remove|list (places, persisted in config), gps status."""
from ovms import config, metrics, shell


def _list(session, args):
    ps = config.instances("location")
    if not ps:
        return "No locations defined (location add <name> <lat> <lon> [radius m])"
    from ovms import gps
    good = gps.places()
    here = metrics.get("v.p.location") or ""
    out = []
    for n in ps:
        if n in good:
            a, b, r = good[n]
            out.append("%s%s: %.6f,%.6f radius %d m" % ("*" if n == here else " ", n, a, b, r))
        else:
            out.append(" %s: damaged entry %r (location remove %s)" % (n, config.get("location", n), n))
    return "\n".join(out)


def _num(t, lo, hi, what):
    try:
        v = float(t)
    except ValueError:
        raise ValueError("%s must be a number" % what)
    if not lo <= v <= hi:
        raise ValueError("%s must be %g..%g" % (what, lo, hi))
    return v


def _add(session, args):
    name = args[0]
    if not 1 <= len(name) <= 32 or any(c in name for c in " ,/#+"):
        return "Error: location name: 1-32 characters, no spaces, commas, / # +"
    try:
        lat = _num(args[1], -90, 90, "latitude")
        lon = _num(args[2], -180, 180, "longitude")
        r = _num(args[3], 5, 100000, "radius") if len(args) > 3 else 100
    except ValueError as e:
        return "Error: %s" % e
    new = name not in config.instances("location")
    if new and len(config.instances("location")) >= 32:
        return "Error: at most 32 locations"
    config.set("location", name, "%.6f,%.6f,%d" % (lat, lon, r))
    return "Location %s %s: %.6f,%.6f radius %d m" % (name, "added" if new else "updated", lat, lon, r)


def _remove(session, args):
    if args[0] not in config.instances("location"):
        return "Error: no location %s" % args[0]
    config.rm("location", args[0])
    return "Location %s removed" % args[0]


def _status(session, args):
    from ovms import gps
    p = gps.parser()
    if not config.get("gps", "enabled"):
        return "GPS: off (config set gps enabled yes; gps uart/rx/tx/baud)"
    if p is None:
        return "GPS: not running"
    return "\n".join((
        "GPS: %s, fix mode %dD, %d satellites used, %d in view" % (
            "lock" if metrics.get("v.p.gpslock") else "no lock", p.mode if p.mode > 1 else 0,
            p.sats, p.visible),
        "Position: %s,%s (%s)" % (metrics.text("v.p.latitude"), metrics.text("v.p.longitude"),
                                 metrics.get("v.p.location") or "no place"),
        "Sentences: %d good, %d bad, %d other" % (p.good, p.bad, p.other)))


shell.register("location", "Locations (geofences)", None)
shell.register("location list", "List locations", _list, "", 0, 0, False)
shell.register("location add", "Add or change a location", _add,
               "<name> <latitude> <longitude> [<radius m>]", 3, 4)
shell.register("location remove", "Remove a location", _remove, "<name>", 1, 1)
shell.register("gps", "GPS receiver", None)
shell.register("gps status", "GPS receiver status", _status, "", 0, 0, False)
