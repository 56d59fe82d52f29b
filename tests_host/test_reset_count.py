"""Crash counting at boot on the virtual device, with the reset causes of the ESP32 port: each
crash counted once, deliberate resets and watchdog resets of a healthy module never."""
import os
import shutil

from util import REPO, VDev
from test_vdev import fire, wait_for

PANIC = "import uctypes; uctypes.bytes_at(8, 4)"  # the interpreter dies (SIGSEGV): a panic

# boot.py and ota_boot are the real ones; main.py is a stand-in that records what boot.py decided
MAIN = """
open('/log.txt', 'a').write('%s:%s ' % (machine.reset_cause(), _boots))
import asyncio
async def idle():
    while True:
        await asyncio.sleep_ms(50)
try:
    asyncio.run(idle())
except KeyboardInterrupt:
    pass
"""


def _flash(tmp_path):
    root = tmp_path / "flash"
    (root / "lib").mkdir(parents=True)
    (root / "store").mkdir()
    shutil.copy(os.path.join(REPO, "boot.py"), root)
    shutil.copy(os.path.join(REPO, "lib", "ota_boot.py"), root / "lib")
    (root / "main.py").write_text(MAIN)
    return root


def _log(root):
    p = root / "log.txt"
    return p.read_text().split() if p.exists() else []


def _boots_after(d, root, code):
    n = len(_log(root))
    fire(d, code)
    assert wait_for(lambda: len(_log(root)) > n, 20), _log(root)
    return _log(root)[-1]


def test_deliberate_resets_never_count_and_each_crash_counts_once(tmp_path):
    root = _flash(tmp_path)
    with VDev(root, extra=("--no-frozen",)) as d:
        assert wait_for(lambda: _log(root) == ["1:0"], 20), _log(root)   # power-on
        for _ in range(3):     # `module reset` x3 (and OTA reboots): HARD_RESET, deliberate
            assert _boots_after(d, root, "import ota_boot; ota_boot.reset('reset')") == "2:0"
        assert _boots_after(d, root, "import ota_boot; ota_boot.reset('ota')") == "2:0"
        # an app crash: logged, reset, counted once (it was counted twice: 3 crashes = 6)
        assert _boots_after(d, root, "import ota_boot; ota_boot.crashed(ValueError('x'), 0)"
                            ) == "2:1"
        assert "ValueError" in (root / "ota" / "crash.txt").read_text()
        # the health task let the watchdog reset a module that had been healthy: not counted
        assert _boots_after(d, root, "import ota_boot, machine, time\n"
                            "ota_boot.note_reset('wdt')\nw = machine.WDT(timeout=200)\n"
                            "time.sleep(5)") == "3:1"
        # a panic (no flag) counts
        assert _boots_after(d, root, PANIC) == "2:2"
        # a stale 'wdt' flag does not excuse a panic; a hang the watchdog caught counts
        assert _boots_after(d, root, "import ota_boot, machine, time\n"
                            "w = machine.WDT(timeout=200)\ntime.sleep(5)") == "3:3"
    assert not (root / "store" / "reset").exists()
    with VDev(root, extra=("--no-frozen",)) as d:   # a power cycle starts from zero
        assert wait_for(lambda: _log(root)[-1:] == ["1:0"], 20), _log(root)


def test_three_crashes_still_mean_safe_mode(tmp_path):
    root = _flash(tmp_path)
    with VDev(root, extra=("--no-frozen",)) as d:
        assert wait_for(lambda: _log(root) == ["1:0"], 20)
        for n in (1, 2, 3):
            assert _boots_after(d, root, "import ota_boot; ota_boot.crashed(None, 0)"
                                ) == "2:%d" % n
        assert d.exec("print(safe_mode)").strip() == "True"


def test_health_marks_a_watchdog_reset_of_a_healthy_module(tmp_path):
    """The health task stops feeding the WDT for a hung task; if the module had been healthy
    (MQTT + CAN) this boot, the next boot does not count the reset (no safe mode from false or
    one-off task stalls); a hang before that still counts."""
    from util import run_mpy, compiled_lib
    (tmp_path / "store").mkdir()
    code = """
import asyncio, os, ota_boot
from ovms import health
ota_boot.ROOT = %r
health.CRASHLOG = ota_boot.ROOT + "/store/crashlog.txt"
health.was_healthy = %s
health.watch("can", lambda: False, 0)
try:
    asyncio.run(asyncio.wait_for_ms(health.run(0), 1200))
except asyncio.TimeoutError:
    pass
try:
    print("flag", open(ota_boot.ROOT + ota_boot.RESET_FLAG).read())
except OSError:
    print("flag none")
"""
    out = run_mpy(code % (str(tmp_path), "False"), path=(compiled_lib(),)).stdout
    assert "flag none" in out and "stopped making progress" in out
    out = run_mpy(code % (str(tmp_path), "True"), path=(compiled_lib(),)).stdout
    assert "flag wdt" in out
