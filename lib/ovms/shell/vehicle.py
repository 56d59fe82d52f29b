"""Shell commands: lock, unlock, climatecontrol, charge, wakeup, homelink (CAN frames from the
vehicle definition: vehicle.command_frames(name, args) -> [(bus, id, ext, data)] or None)."""
from ovms import shell


def _vehicle():
    h = shell.hooks.get("vehicle")
    if h is None:
        import sys
        vm = sys.modules.get("ovms.can.vehicle")    # the loaded vehicle, if the app loaded one
        if vm is None:
            return None
        h = vm.current
    return h()


def _do(name, args, label, ok, fail):
    v = _vehicle()
    if v is None:
        return "Error: No vehicle module selected"
    cf = getattr(v, "command_frames", None)
    try:
        frames = cf(name, args) if cf else None
    except ValueError as e:
        return "Error: %s" % (e,)
    if not frames:
        return "Error: %s not available on this vehicle" % label
    from ovms.shell import can as cmd_can
    try:
        frames = [cmd_can.frame(f) for f in frames]
    except ValueError as e:
        return "Error: %s: invalid frame in vehicle definition (%s)" % (label, e)
    for f in frames:
        e = cmd_can.send(*f)
        if e:
            return "Error: %s (%s)" % (fail, e)
    return ok


shell.register("lock", "Lock vehicle",
               lambda s, a: _do("lock", a, "Lock", "Vehicle locked", "vehicle could not be locked"),
               "[<pin>]", 0, 1, True)
shell.register("unlock", "Unlock vehicle",
               lambda s, a: _do("unlock", a, "Unlock", "Vehicle unlocked", "vehicle could not be unlocked"),
               "[<pin>]", 0, 1, True)
shell.register("climatecontrol", "Climate control", None)
shell.register("climatecontrol on", "Turn climate control on",
               lambda s, a: _do("climatecontrol.on", a, "Climate control", "Climate Control on",
                                "Climate Control could not be turned on"), "", 0, 0, True)
shell.register("climatecontrol off", "Turn climate control off",
               lambda s, a: _do("climatecontrol.off", a, "Climate control", "Climate Control off",
                                "Climate Control could not be turned off"), "", 0, 0, True)
shell.register("charge", "Charge control", None)
shell.register("charge start", "Start charging",
               lambda s, a: _do("charge.start", a, "Charge start", "Charge has been started",
                                "Could not start charge"), "", 0, 0, True)
shell.register("charge stop", "Stop charging",
               lambda s, a: _do("charge.stop", a, "Charge stop", "Charge has been stopped",
                                "Could not stop charge"), "", 0, 0, True)


def _num(a, lo, hi):
    # -> int in lo..hi or None
    try:
        v = int(a.rstrip("%A"))
    except ValueError:
        return None
    return v if lo <= v <= hi else None


def _limit(s, a):
    soc = _num(a[0], 1, 100)
    if soc is None:
        return "Error: Charge limit must be a SOC of 1..100 %"
    return _do("charge.limit", [soc], "Charge limit", "Charge limit set to %d%%" % soc,
               "Could not set charge limit")


def _current(s, a):
    amps = _num(a[0], 1, 500)
    if amps is None:
        return "Error: Charge current must be 1..500 A"
    return _do("charge.current", [amps], "Charge current", "Charge current limit set to %dA" % amps,
               "Could not set charge current")


def _homelink(s, a):
    n = _num(a[0], 1, 3)
    if n is None:
        return "Error: Homelink button must be 1, 2 or 3"
    return _do("homelink", [n], "Homelink", "Homelink #%d activated" % n, "Could not activate homelink")


shell.register("charge limit", "Set the charge limit (SOC %)", _limit, "<soc>", 1, 1, True)
shell.register("charge current", "Set the charge current limit (A)", _current, "<amps>", 1, 1, True)
shell.register("wakeup", "Wake up the vehicle",
               lambda s, a: _do("wakeup", a, "Wakeup", "Vehicle has been woken", "Could not wake the vehicle"),
               "", 0, 0, True)
shell.register("homelink", "Activate a homelink button", _homelink, "1|2|3", 1, 1, True)
