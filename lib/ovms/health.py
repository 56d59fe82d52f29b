"""Health: module metrics, a persistent crash log and the watchdog fed only while tasks progress."""
import asyncio
import gc
import time

from micropython import const

from ovms import metrics

CRASHLOG = "/store/crashlog.txt"
_KEEP = const(8)          # crash log entries kept
_watch = {}               # task name -> [probe() -> bool, allowed silence ms, last ok ticks, frozen]
peak_alloc = 0            # heap high-water mark (bytes in use) since boot
min_free = 1 << 30
was_healthy = False       # the app reached MQTT + CAN this boot (set by the app)


def watch(name, probe, max_silence_ms):
    """Declare a critical task: probe() must report progress at least every max_silence_ms."""
    _watch[name] = [probe, max_silence_ms, time.ticks_ms(), False]


def freeze(name):
    """Treat a task as hung from now on (`module watchdog test`); False if unknown."""
    w = _watch.get(name)
    if w is None:
        return False
    w[3] = True
    return True


def hung():
    """Names of critical tasks that have shown no progress for too long."""
    now = time.ticks_ms()
    bad = []
    for n, w in _watch.items():
        ok = False
        if not w[3]:
            try:
                ok = w[0]()
            except Exception:  # a failing probe counts as no progress
                ok = False
        if ok:
            w[2] = now
        elif time.ticks_diff(now, w[2]) > w[1]:
            bad.append(n)
    return bad


def report():
    """`module watchdog`: each critical task and how long since it showed progress."""
    now = time.ticks_ms()
    return "\n".join("%-12s %s, last progress %d s ago (limit %d s)"
                     % (n, "FROZEN (test)" if w[3] else "ok", time.ticks_diff(now, w[2]) // 1000,
                        w[1] // 1000) for n, w in _watch.items()) or "No critical tasks"


def log_crash(reason):
    """Append a reason to the crash log on flash (last _KEEP kept)."""
    t = time.gmtime()
    line = "%04d-%02d-%02d %02d:%02d:%02d up %ds: %s" % (t[0], t[1], t[2], t[3], t[4], t[5],
                                                         metrics.uptime(), reason)
    lines = crashes() + [line.replace("\n", " ")[:200]]
    try:
        from ovms import fsutil
        fsutil.write(CRASHLOG, "\n".join(lines[-_KEEP:]) + "\n")
    except OSError as e:
        print("health: cannot write crash log:", e)


def crashes():
    try:
        with open(CRASHLOG) as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError:
        return []


def _define():
    for name in ("m.freeram.min", "m.heap.used", "m.heap.peak"):
        if metrics.find(name) < 0:
            metrics.define(name, "i", "")


def sample(collect=False):
    """Refresh the module health metrics (every second; with collect, live heap after a GC).

    m.freeram / m.heap.used: free and live heap after the last collection; m.heap.peak and
    m.freeram.min: the high-water mark (most in use, least free, garbage included)."""
    global peak_alloc, min_free
    free = gc.mem_free()
    used = gc.mem_alloc()
    peak_alloc = max(peak_alloc, used)
    min_free = min(min_free, free)
    if collect:
        gc.collect()
        metrics.set("m.freeram", gc.mem_free())
        metrics.set("m.heap.used", gc.mem_alloc())
    metrics.set("m.freeram.min", min_free)
    metrics.set("m.heap.peak", peak_alloc)
    metrics.set("m.monotonic", metrics.uptime())
    t = time.time()
    if time.gmtime(0)[0] == 2000:
        t += 946684800
    if t > 1700000000:  # only once the clock is set
        metrics.set("m.time.utc", t)


async def run(wdt_timeout_s, tasks=None):
    """Task: sample health metrics; feed the hardware watchdog while no critical task hangs."""
    _define()
    wdt = None
    if wdt_timeout_s:
        import machine
        wdt = machine.WDT(timeout=wdt_timeout_s * 1000)
    reported = False
    n = 0
    while True:
        n += 1
        try:
            sample(n % 8 == 1)  # live heap every 4 s
            if tasks:
                metrics.set("m.tasks", tasks())
        except Exception as e:  # health metrics must never stop the watchdog logic
            print("health:", repr(e))
        bad = hung()
        if not bad:
            if wdt:
                wdt.feed()
        elif not reported:
            reported = True
            msg = "watchdog: task %s stopped making progress" % ",".join(bad)
            print("health:", msg, "- reset follows")
            log_crash(msg)
            if was_healthy:   # a task stalled in a module that ran: not a crash loop at boot
                try:
                    import ota_boot
                    ota_boot.note_reset("wdt")
                except ImportError:
                    pass
        await asyncio.sleep_ms(500)
