"""ota_boot: picks the app slot at boot, runs trial boots and rolls back; never replaced by app OTA."""
import sys
import os
import json

# Flash layout (ROOT is "" on the device; tests point it at a temp dir):
#   /lib/...              factory app ("f"): deployed with `make deploy` or frozen in the firmware
#   /app/a/lib, /app/b/lib  OTA slots; /app/<s>/manifest.json (+ .sig) is written last = complete
#   /ota/state.json       {"run","stg","prev","tries","dl","fail","crash","fw","sv"} (tmp + rename)
#                         sv: highest app version ever committed (anti-rollback: ovms.ota_rx
#                         refuses an app bundle not newer, unless signed as a downgrade)
ROOT = ""
TRIALS = 1          # boots a staged app gets to report healthy before it is rolled back
CRASHES = 3         # consecutive crashes of a committed app before falling back to the previous one
DEADLINE = 180      # seconds a trial app has to report healthy (manifest "deadline" overrides)

booted = None       # slot running this boot: "a", "b" or "f"
trial = False       # the booted app/firmware has not reported healthy yet
healthy = False


def load():
    """Current state dict ({} if none); falls back to the tmp copy of an interrupted save."""
    for n in ("state.json", "state.tmp"):
        try:
            with open(ROOT + "/ota/" + n) as f:
                s = json.load(f)
            if isinstance(s, dict):
                return s
        except (OSError, ValueError):
            pass
    return {}


def save(s):
    """Write the state atomically (tmp file + rename)."""
    d = ROOT + "/ota"
    try:
        os.mkdir(d)
    except OSError:
        pass
    with open(d + "/state.tmp", "w") as f:
        json.dump(s, f)
    try:
        os.rename(d + "/state.tmp", d + "/state.json")
    except OSError:     # FAT cannot rename over a file; load() reads state.tmp meanwhile
        os.remove(d + "/state.json")
        os.rename(d + "/state.tmp", d + "/state.json")


def manifest(slot):
    """The parsed manifest of a slot, or None."""
    try:
        with open("%s/app/%s/manifest.json" % (ROOT, slot)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def complete(slot):
    """True if slot is the factory app or every file of its manifest is present at full size."""
    if slot == "f":
        return True
    m = manifest(slot)
    if not m:
        return False
    try:
        for p, size, _ in m["files"]:
            if os.stat("%s/app/%s/%s" % (ROOT, slot, p))[6] != size:
                return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True


def _label():
    try:
        import esp32
        return esp32.Partition(esp32.Partition.RUNNING).info()[4]
    except Exception:
        return None


def select():
    """Choose the app for this boot, put it first on sys.path; returns the slot ("a"/"b"/"f")."""
    global booted, trial
    s = load()
    dirty = False
    fw = s.get("fw")
    if fw and fw.get("st") in ("staged", "trial"):
        if _label() == fw.get("label"):
            if fw["st"] == "staged":
                fw["st"] = "trial"
                dirty = True
            trial = True
        else:
            s["fail"] = "firmware %s %s: rolled back" % (fw.get("ver"), "did not boot" if fw[
                "st"] == "staged" else "did not report healthy")
            s["fw"] = None
            dirty = True
    stg = s.get("stg")
    use = None
    if stg:
        if not complete(stg):
            s["fail"] = "staged update in slot %s is incomplete: discarded" % stg
        elif s.get("tries", 0) < TRIALS:
            s["tries"] = s.get("tries", 0) + 1
            use = stg
            trial = True
            try:
                os.remove(ROOT + "/ota/crash.txt")
            except OSError:
                pass
        else:
            s["fail"] = "%s did not report healthy%s: rolled back" % (
                manifest(stg).get("version"), _crash())
        if use is None:
            s["stg"] = None
            s["tries"] = 0
        dirty = True
    if use is None:
        for c in (s.get("run"), s.get("prev")):
            if c and complete(c):
                use = c
                break
        else:
            use = "f"
    if dirty:
        save(s)
    booted = use
    if use != "f":
        sys.path.insert(0, "%s/app/%s/lib" % (ROOT, use))
        _intern("%s/app/%s/lib/.qstrs" % (ROOT, use))
    else:
        try:
            import ovms                     # the factory app: deployed .mpy files, or frozen
            if ovms.__file__.startswith(ROOT + "/lib/"):
                _intern(ROOT + "/lib/.qstrs")
        except Exception:
            pass
    if trial:
        _arm(s.get("dl") or DEADLINE)
    return use


def _intern(path):
    """Intern the app's names now, while the heap is empty (a file written by deploy/OTA).

    Frozen code has its names in the firmware; names of .mpy files are interned when they load,
    and a qstr pool grown late needs a large contiguous block of a fragmented heap."""
    try:
        import gc
        with open(path) as f:
            n = 0
            for ln in f:
                getattr(None, ln.rstrip("\n"), None)
                n += 1
                if not n & 127:
                    gc.collect()
    except OSError:
        pass


def _crash():
    try:
        with open(ROOT + "/ota/crash.txt") as f:
            t = f.read().strip().split("\n")[-1]
        return " (" + t + ")" if t else ""
    except OSError:
        return ""


def _arm(secs):
    try:
        from machine import Timer
        Timer(0).init(mode=Timer.ONE_SHOT, period=secs * 1000, callback=lambda t: expire())
    except Exception:
        pass        # no hardware timer (virtual device): ota.guard() enforces the deadline


def expire():
    """Deadline passed: reset unless the app reported healthy (the next boot rolls back)."""
    if trial and not healthy:
        reset("trial")


def vkey(v):
    """The numbers in a version string, for ordering: "1.10.2-rc1" -> [1, 10, 2, 1]."""
    r = []
    n = -1
    for c in str(v).encode():
        if 48 <= c <= 57:
            n = (0 if n < 0 else n * 10) + c - 48
        elif n >= 0:
            r.append(n)
            n = -1
    if n >= 0:
        r.append(n)
    return r


def mark_healthy():
    """Called once MQTT is connected and CAN runs: commits a trial app/firmware. True if committed."""
    global healthy, trial
    if healthy:
        return False
    healthy = True
    s = load()
    ch = False
    if booted != "f" and booted == s.get("stg"):
        s["prev"] = s.get("run") or "f"
        s["run"] = booted
        s["stg"] = None
        s["tries"] = 0
        s["fail"] = None
        v = (manifest(booted) or {}).get("version")
        if v is not None and vkey(v) > vkey(s.get("sv") or ""):
            s["sv"] = v
        ch = True
    fw = s.get("fw")
    if fw and fw.get("st") == "trial":
        fw["st"] = "ok"
        ch = True
    if s.get("crash"):
        s["crash"] = 0
        ch = True
    if ch:
        save(s)
    trial = False
    try:
        import esp32
        esp32.Partition.mark_app_valid_cancel_rollback()
    except Exception:
        pass        # no esp32 module, or bootloader without rollback (OSError -261)
    return ch


def crashed(exc=None, delay=1):
    """main.py calls this when the app raised: log it, fall back if needed, reset (the next
    boot counts the crash once: the reset flag says "crash")."""
    try:
        try:
            os.mkdir(ROOT + "/ota")
        except OSError:
            pass
        with open(ROOT + "/ota/crash.txt", "w") as f:
            if exc is not None:
                sys.print_exception(exc, f)
        s = load()
        if not trial and booted not in (None, "f"):
            s["crash"] = n = s.get("crash", 0) + 1
            p = s.get("prev")
            if n >= CRASHES and p and complete(p):
                s["fail"] = "%s crashed %d times at start%s: back to %s" % (
                    (manifest(booted) or {}).get("version"), n, _crash(), p)
                s["run"], s["prev"], s["crash"] = p, None, 0
            save(s)
    except Exception as e:
        print("ota_boot:", e)
    if delay:
        import time
        time.sleep(delay)
    reset("crash")


# Why the last reset happened, written just before it (the ESP32 reports machine.reset(), an
# OTA reboot and a panic all as HARD_RESET): boot.py reads and removes it. "crash": an app crash
# (counted once, by boot.py); "wdt": the health task let the watchdog reset a module that had
# been healthy (not counted); anything else: a deliberate reset (module reset, OTA reboot).
RESET_FLAG = "/store/reset"


def note_reset(why):
    """Record why the coming reset happens (see RESET_FLAG)."""
    try:
        with open(ROOT + RESET_FLAG, "w") as f:
            f.write(why)
    except OSError:
        pass


def reset(why="reset"):
    """Hard reset for a reason (see RESET_FLAG; the virtual device restarts the process)."""
    note_reset(why)
    cfg = sys.modules.get("ovms.config")
    if cfg is not None:
        try:
            cfg.flush()         # a config change the app had not written yet
        except Exception as e:
            print("ota_boot: config not saved:", e)
    import machine
    if hasattr(machine, "reset"):
        machine.reset()
    sys.exit(99)
