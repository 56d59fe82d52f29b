"""Soak: the virtual device replays a real drive for minutes: no watchdog reset, no crash-log
entry, no heap growth.

OVMS_SOAK_S sets the duration in seconds (default 120: with a 5-s watchdog that is 24 watchdog
periods); `OVMS_SOAK_S=600` (or `tools/bench.py soak`) runs the full 10-minute soak."""
import os
import re
import time

from util import run_mpy, compiled_lib
from test_e2e import DRIVE, HEAP, Client, ovms
from util import VDev

SOAK_S = float(os.environ.get("OVMS_SOAK_S") or 120)
WDT_S = 5      # the shortest watchdog the module accepts for its tasks: many periods per soak


def test_can_probe_counts_a_just_updated_metric_as_fresh():
    """The watchdog's CAN probe: an age of 0 s (updated this second) is progress."""
    out = run_mpy("""
from ovms import metrics, app
metrics.define("m.can0.frames", "i", "")
print(app.fresh("m.can0.frames"))
metrics.set("m.can0.frames", 5)
print(metrics.age("m.can0.frames"), app.fresh("m.can0.frames"))
""", path=(compiled_lib(),)).stdout.split()
    assert out == ["False", "0", "True"]


def _number(text, name):
    m = re.search(r"(-?\d+)", text.replace(name, ""))  # `metrics get` prints the value
    assert m, "%s not in %r" % (name, text)
    return int(m.group(1))


def test_soak_real_drive_no_reset_no_crash_no_heap_growth(tmp_path, broker):
    root = tmp_path / "flash"
    d = VDev(root, can_log=DRIVE, heap=HEAP).start()
    try:
        ovms("--port", d.pty, "config", "set", "module", "watchdog.timeout", str(WDT_S))
        ovms("--port", d.pty, "provision", "--wifi", "car", "wifipw", "--mqtt-host", "localhost",
             "--mqtt-port", str(broker.tls_port), "--ca", broker.ca, "--type", "RV",
             "--id", "SOAK")
        c = Client(broker, "ovms//SOAK/")
        try:
            c.wait("metric/s/v3/connected", lambda v: v == "yes", timeout=90)
            t0 = time.time()
            up0 = _number(c.command("metrics get m.monotonic"), "m.monotonic")
            heap = []       # (seconds into the soak, live heap after the last GC)
            while time.time() - t0 < SOAK_S:
                time.sleep(min(10, max(0.1, SOAK_S - (time.time() - t0))))
                out = c.command("metrics get m.heap.used")
                heap.append((time.time() - t0, _number(out, "m.heap.used")))
            up = _number(c.command("metrics get m.monotonic"), "m.monotonic")
            log = c.command("module crashlog")
            frames = _number(c.command("metrics get m.can0.frames"), "m.can0.frames")
        finally:
            c.close()
        print("soak %.0f s: uptime %d s, frames %d, live heap %s"
              % (SOAK_S, up, frames, [h for _, h in heap]))
        assert up - up0 >= SOAK_S - 5, "the module reset during the soak (uptime %d)" % up
        assert "reset follows" not in d.console()
        assert "No crashes recorded" in log, log
        assert frames > 1000
        # no growth: the live heap late in the run stays where it was early on (after warm-up)
        third = max(1, len(heap) // 3)
        early = min(h for _, h in heap[:third])
        late = min(h for _, h in heap[-third:])
        assert late <= early + 4096, "live heap grew from %d to %d" % (early, late)
    finally:
        d.stop()
