"""The micro-ovms application: starts, supervises and stops the module's tasks."""
import asyncio
import os
import sys
import time

from micropython import const

import ovms
from ovms import config, events, health, metrics

STORE = "/store"
METRICS_FILE = STORE + "/metrics.dat"
BOOTS_FILE = STORE + "/boots"  # crash count (see boot.py, ota_boot.RESET_FLAG)
_SAVE_GAP_MS = const(5000)  # config saves at most this often (each costs a 45-ms sector erase)
_STABLE_S = const(60)     # up this long: the boot counts as good (clears the crash-boot count)
_tasks = []


def _spawn(name, coro):
    _tasks.append((name, asyncio.create_task(coro)))


def task_list():
    """[(name, state)] of the app's tasks (`module tasks`, m.tasks)."""
    return [(n, "done" if t.done() else "running") for n, t in _tasks]


def _running():
    return sum(1 for _, t in _tasks if not t.done())


def _version():
    try:
        import ota_boot
        slot = ota_boot.booted or "f"
    except ImportError:
        slot = "f"
    v = sys.implementation.version
    return "%s/%s (MicroPython %d.%d.%d, %s)" % (ovms.VERSION, slot, v[0], v[1], v[2], sys.platform)


def _set(name, value):
    try:
        metrics.set(name, value)
    except (ValueError, KeyError) as e:
        print("app: metric", name, e)


def _setup():
    """Config, persisted metrics and the static module metrics; returns config warnings."""
    try:
        os.mkdir(STORE)
    except OSError:
        pass
    config.init(STORE)
    warnings = config.load()
    for w in warnings:
        print("config:", w)
    try:
        metrics.load(METRICS_FILE)
    except Exception as e:  # a damaged metrics file costs the restored values, nothing else
        print("app: persisted metrics not restored:", repr(e))
    _set("m.version", _version())
    _set("m.hardware", "ESP32 (%s)" % sys.platform)
    try:
        import machine
        _set("m.serial", "".join("%02x" % b for b in machine.unique_id()))
    except (ImportError, AttributeError):
        pass
    return warnings


def _start_vehicle():
    """Load the configured vehicle and start its CAN buses; returns the Vehicle or None."""
    from ovms.can import bus as canbus, vehicle
    vt = config.get("vehicle", "type")
    v = None
    if vt:
        try:
            v = vehicle.load(vt)
            _set("v.type", vt)
        except (ImportError, ValueError) as e:
            print("app: vehicle", vt, "not loaded:", e)
    pm = config.get("vehicle", "poll")
    poll = None
    if pm == "obd" or pm == "auto" and getattr(v, "poll", None):
        try:
            from ovms.poll import poller
            poll = poller.configured(v, pm == "obd", config)
        except Exception as e:  # a bad poll list costs the polling, nothing else
            print("app: poller not started:", repr(e))
    try:
        canbus.start(v, listen_only=config.get("vehicle", "can.mode") != "normal" and not poll,
                     bitrate=config.get("vehicle", "can.bitrate") if config.is_set(
                         "vehicle", "can.bitrate") else None, extra=poll and poll[1])
        if poll:
            _spawn("poll", poller.start(poll, canbus.buses()))
    except Exception as e:  # no CAN controller: the rest of the module still works
        print("app: CAN not started:", repr(e))
    return v


def _watchdog_cmd(session, args):
    if not args:
        return health.report()
    if len(args) == 2 and args[0] == "test":
        if health.freeze(args[1]):
            return "Task %s now counts as hung: the watchdog resets the module" % args[1]
        return "Error: no critical task %s (module watchdog lists them)" % args[1]
    return "Usage: module watchdog [test <task>]"


def fresh(m, secs=3):
    """True if metric m was updated within secs seconds (an age of 0 is fresh, None never)."""
    a = metrics.age(m)
    return a is not None and a <= secs


def _watch():
    """The critical tasks the watchdog waits for (each may be silent for the WDT timeout)."""
    from ovms.can import bus as canbus
    from ovms.v3 import server as server_v3
    ms = max(5, config.get("module", "watchdog.timeout")) * 1000
    if canbus.buses():
        name = canbus.buses()[0].name
        # the CAN task refreshes its counters every second
        health.watch("can", lambda: fresh("m.%s.frames" % name), ms)
    health.watch("mqtt", server_v3.alive, ms)


def _hooks():
    # the shell itself loads on the first command
    from ovms.can import bus as canbus, vehicle
    from ovms.v3 import server as server_v3
    ovms.hooks.update(watchdog=_watchdog_cmd, can_send=canbus.send, can_status=canbus.status,
                      vehicle=vehicle.current, notify=server_v3.notify,
                      event=events.raise_event, tasks=task_list, crashlog=health.crashes)
    events.listen(server_v3.event)


def _healthy():
    """MQTT connected and CAN running (what an OTA trial version must show)."""
    from ovms.can import bus as canbus
    from ovms.v3 import server as server_v3
    s = server_v3.server()
    mqtt_up = bool(s and getattr(s, "connected", False)) or metrics.get("s.v3.connected") is True
    can_up = any(getattr(b, "_running", False) for b in canbus.buses())
    return mqtt_up and can_up


async def _stable():
    """Commit a trial OTA version once healthy; clear the crash-boot count once up a while.
    (ota_boot is loaded since boot.py; the rest of the OTA code only loads when used.)"""
    try:
        import ota_boot
    except ImportError:
        ota_boot = None
    t = 0
    while ota_boot or t < _STABLE_S:
        if ota_boot and _healthy():
            health.was_healthy = True  # a watchdog reset from now on is not a crash loop
            if ota_boot.mark_healthy():
                print("app: new version reported healthy and committed")
            ota_boot = None
        if t == _STABLE_S:
            try:
                os.remove(BOOTS_FILE)
            except OSError:
                pass
        await asyncio.sleep(2)
        t += 2


async def _save_config():
    """config's save in steps, the event loop running between them: each step blocks the loop
    for one flash write (a sector erase: 45 ms), never the whole save (tmp file, two renames)."""
    from ovms.fsutil import replace
    c = config
    if c._frozen:
        c._save()           # raises: read-only
    c._dirty = False
    cfg = c.path()
    tmp = cfg + ".tmp"
    try:
        try:
            os.mkdir(c._root)
        except OSError:
            pass
        with open(tmp, "wb") as f:
            c._emit(f, c._data, c._gen + 1)
            await asyncio.sleep_ms(0)   # closing is another flash write
        await asyncio.sleep_ms(0)
        if c._exists(cfg):
            replace(cfg, cfg + ".bak")
            await asyncio.sleep_ms(0)
        replace(tmp, cfg)
    except BaseException:
        c._dirty = True     # not written: the saver tries again
        raise
    c._gen += 1


async def _config_saver():
    """Task: writes config changes shortly after they are made (off the command path): 0.1 s
    after a change, but at most once per _SAVE_GAP_MS, so a stream of changes costs one
    flash erase per gap, not one per change (a reset or stop writes what is pending)."""
    ev = asyncio.Event()
    config._later = ev.set
    last = time.ticks_add(time.ticks_ms(), -_SAVE_GAP_MS)
    while True:
        await ev.wait()
        ev.clear()
        await asyncio.sleep_ms(100)     # a burst of changes: one write
        wait = _SAVE_GAP_MS - time.ticks_diff(time.ticks_ms(), last)
        if wait > 0:
            await asyncio.sleep_ms(wait)
        if config._dirty:
            last = time.ticks_ms()
            try:
                await _save_config()
            except Exception as e:      # kept in RAM and retried: no change is lost
                print("app: config not saved, retrying:", repr(e))
                await asyncio.sleep(5)
                ev.set()


async def _main():
    from ovms import net
    from ovms.v3 import server as server_v3
    warnings = _setup()
    _hooks()
    _start_vehicle()
    server_v3.start()
    _watch()
    for w in warnings:
        server_v3.notify("alert", "config", w)
    _spawn("config", _config_saver())
    _spawn("net", net.run())
    _spawn("metrics", metrics.run(METRICS_FILE, 600))
    _spawn("health", health.run(config.get("module", "watchdog.timeout"), _running))
    _spawn("stable", _stable())
    if config.get("gps", "enabled"):
        from ovms import gps
        _spawn("gps", gps.run())
    try:
        import ota_boot
        if ota_boot.trial:
            from ovms import ota
            _spawn("ota.guard", ota.guard(config.get("ota", "health.deadline")))
    except ImportError:
        pass
    events.raise_event("system.start")
    while True:
        await asyncio.sleep(3600)


def stop():
    """Stop the app cleanly: CAN off, MQTT says goodbye, persisted metrics saved."""
    from ovms.can import bus as canbus
    from ovms.v3 import server as server_v3
    p = sys.modules.get("ovms.poll.poller")
    if p:
        p.stop()
    config._later = None
    try:
        config.flush()
    except Exception as e:
        print("app: config not saved:", repr(e))
    canbus.stop()
    asyncio.new_event_loop()
    try:
        asyncio.run(asyncio.wait_for_ms(server_v3.stop(), 3000))
    except Exception as e:  # the broker may be gone: stopping must still finish
        print("app: MQTT stop:", repr(e))
    try:
        metrics.save(METRICS_FILE)
    except Exception as e:
        print("app: metrics not saved:", repr(e))
    _tasks.clear()
    asyncio.new_event_loop()


def unload():
    """Forget the app's modules and their data so the REPL gets the heap back."""
    import gc
    import ovms
    ovms.hooks.clear()
    for name in [k for k in sys.modules if k.startswith("ovms.") or k.startswith("veh_")]:
        if name[0] == "o":
            ovms.unload(name[5:])
        else:
            del sys.modules[name]
    gc.collect()


def _keep_watchdog_fed():
    """The ESP32 watchdog cannot be stopped: keep feeding it while a person uses the REPL."""
    if not config.get("module", "watchdog.timeout"):
        return
    try:
        import machine
        wdt = machine.WDT(timeout=config.get("module", "watchdog.timeout") * 1000)
        machine.Timer(-1).init(period=1000, callback=lambda t: wdt.feed())
    except (ImportError, AttributeError, ValueError):
        pass


def main():
    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        stop()
        _keep_watchdog_fed()
        unload()
        print("micro-ovms stopped (Ctrl-C). REPL ready: machine.reset() restarts the module.")
    except Exception as e:
        sys.print_exception(e)
        health.log_crash("app: %r" % (e,))
        import ota_boot
        ota_boot.crashed(e)  # counts it, logs it, falls back if needed, resets
