"""Shell commands: stat, module info|memory|tasks|reset, notify raise, event raise, server v3."""
import gc
import sys
import time
from ovms import shell

_H = shell.hooks


def _metric(name):
    # -> (value, unit) of a defined metric, or (None, "")
    try:
        from ovms import metrics as m
        i = m.find(name)
        if i is None or i < 0 or not m.defined(i):
            return None, ""
        return m.get(i), m.unit(i)
    except Exception:
        return None, ""


def _cap(s):
    s = str(s)
    return s[:1].upper() + s[1:]


def _stat(session, args):
    o = shell.Out(session)
    ch, _ = _metric("v.c.charging")
    if ch:
        mode, _ = _metric("v.c.mode")
        st, _ = _metric("v.c.state")
        o.add("%s - %s" % (_cap(mode or "standard"), _cap(st or "charging")))
    else:
        o.add("Not charging")
    for name, label, fmt in (("v.b.soc", "SOC", "%.1f"), ("v.b.range.ideal", "Ideal range", "%.0f"),
                             ("v.b.range.est", "Est. range", "%.0f"), ("v.p.odometer", "ODO", "%.1f"),
                             ("v.b.cac", "CAC", "%.1f"), ("v.b.soh", "SOH", "%.0f"),
                             ("v.c.kwh", "Energy", "%.1f")):
        v, u = _metric(name)
        if v is None or (name == "v.c.kwh" and not ch):
            continue
        try:
            v = fmt % v
        except TypeError:
            v = str(v)
        o.add("%s: %s%s" % (label, v, u))
    return o.text()


def _uptime():
    try:
        from ovms import metrics
        return metrics.uptime()
    except Exception:
        return time.ticks_ms() // 1000


def _info(session, args):
    import ovms
    impl = sys.implementation
    v = ".".join(str(x) for x in impl.version[:3])
    try:
        from ovms import config
        vid = config.get("vehicle", "id", "") or "(not set)"
        vt = config.get("vehicle", "type", "") or "(none)"
    except Exception:
        vid = vt = "(config unavailable)"
    gc.collect()
    return ("Firmware: micro-ovms %s\nMicroPython: %s (%s)\nVehicle type: %s\nVehicle ID: %s\n"
            "Uptime: %d s\nFree heap: %d bytes"
            % (getattr(ovms, "VERSION", "?"), v, sys.platform, vt, vid, _uptime(), gc.mem_free()))


def _memory(session, args):
    t = time.ticks_us()
    gc.collect()
    t = time.ticks_diff(time.ticks_us(), t)
    f = gc.mem_free()
    a = gc.mem_alloc()
    return ("Heap total: %d bytes\nHeap used:  %d bytes\nHeap free:  %d bytes\nGC collect: %d.%d ms"
            % (f + a, a, f, t // 1000, (t % 1000) // 100))


def _listing(session, hook, missing, empty):
    # a hook's list (or text) as shell output: pairs as "%-20s %s", other items as text
    h = _H.get(hook)
    if h is None:
        return missing
    r = h()
    if isinstance(r, str):
        return r or empty
    o = shell.Out(session)
    for x in r:
        if not o.add(x if isinstance(x, str) else "%-20s %s" % tuple(x[:2])):
            break
    return o.text() or empty


def _tasks(session, args):
    return _listing(session, "tasks", "Error: Task list not available", "No tasks")


def _crashlog(session, args):
    return _listing(session, "crashlog", "Error: Crash log not available", "No crashes recorded")


async def _later_reset():
    import asyncio
    await asyncio.sleep(1)
    import ota_boot
    ota_boot.reset("reset")  # deliberate: never counted as a crash


def _reset(session, args):
    h = _H.get("reset")
    if h is None:
        try:
            import machine
            if not hasattr(machine, "reset"):
                return "Error: Reset not supported on this platform"
            import asyncio
            asyncio.create_task(_later_reset())
        except Exception as e:
            return "Error: Reset failed (%r)" % (e,)
    else:
        h()
    return "Resetting system..."


def _name_ok(s, n=64):
    if not s or len(s) > n:
        return False
    for c in s:
        if not (c.isalpha() or c.isdigit() or c in "._-"):
            return False
    return True


def _hook(name, attr):
    # app hook, else ovms.events.<attr>, else None
    h = _H.get(name)
    if h is None:
        try:
            from ovms import events
            h = getattr(events, attr, None)
        except ImportError:
            pass
    return h


def _notify(session, args):
    typ, sub = args[0], args[1]
    if typ not in ("info", "alert", "error", "data"):
        return "Error: Notification type must be info, alert, error or data"
    if not _name_ok(sub):
        return "Error: Invalid notification subtype (letters, digits, . _ -)"
    text = " ".join(args[2:])
    h = _hook("notify", "notify")
    if h is None:
        return "Error: Notifications not available"
    h(typ, sub, text)
    return "Raised %s notification on %s" % (typ, sub)


def _event(session, args):
    name = args[0]
    if not _name_ok(name):
        return "Error: Invalid event name (letters, digits, . _ -)"
    h = _hook("event", "raise_event")
    if h is None:
        return "Error: Events not available"
    h(name)
    return "Raised event: %s" % name


def _srv_status(session, args):
    h = _H.get("server_status")
    if h is None:
        return "State: Not running"
    return h()


def _update(what):
    h = _H.get("server_update")
    if h is None:
        return "Error: Server V3 not running"
    return h(what)   # may return a coroutine: run_async() awaits it


shell.register("stat", "Show vehicle status", _stat, "", 0, 0, False)
shell.register("module", "Module information and control", None)
shell.register("module info", "Firmware, vehicle and uptime", _info, "", 0, 0, False)
shell.register("module memory", "Heap usage", _memory, "", 0, 0, False)
shell.register("module tasks", "Running tasks", _tasks, "", 0, 0, False)
shell.register("module crashlog", "Recent crashes and resets", _crashlog, "", 0, 0, False)
shell.register("module reset", "Restart the module", _reset, "", 0, 0, True)
shell.register("module watchdog", "Critical tasks the watchdog waits for",
               lambda s, a: _H["watchdog"](s, a) if "watchdog" in _H else
               "Error: Watchdog not running", "", 0, 0, False)
shell.register("module watchdog test", "Treat a task as hung: the watchdog resets the module",
               lambda s, a: _H["watchdog"](s, ["test"] + a) if "watchdog" in _H else
               "Error: Watchdog not running", "<task>", 1, 1, True)
shell.register("notify", "Notification framework", None)
shell.register("notify raise", "Raise a notification", _notify, "info|alert|error|data <subtype> <text>",
               3, -1, True)
shell.register("event", "Event framework", None)
shell.register("event raise", "Raise an event", _event, "<event>", 1, 1, True)
shell.register("server", "Server framework", None)
shell.register("server v3", "OVMS v3 MQTT server", _srv_status, "[status|update]", 0, 0, False)
shell.register("server v3 status", "Connection state", _srv_status, "", 0, 0, False)
shell.register("server v3 update", "Publish metrics now", None)
shell.register("server v3 update all", "Publish all metrics now", lambda s, a: _update("all"),
               "", 0, 0, False)
shell.register("server v3 update modified", "Publish modified metrics now", lambda s, a: _update("modified"),
               "", 0, 0, False)
