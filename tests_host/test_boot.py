"""boot.py/main.py on the virtual device: safe mode after repeated crashes, cleared by power-on."""
import os
import shutil
import subprocess
import time

from util import REPO, VDev


def flash(tmp_path, boots=None):
    root = tmp_path / "flash"
    (root / "store").mkdir(parents=True)
    for f in ("boot.py", "main.py"):
        shutil.copy(os.path.join(REPO, f), root)
    if boots is not None:
        (root / "store" / "boots").write_text(str(boots))
    return root


def wait_console(d, text, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if text in d.console():
            return True
        time.sleep(0.1)
    return False


def test_third_abnormal_reset_in_a_row_gives_safe_mode_until_power_on(tmp_path):
    """Two abnormal boots recorded, then a watchdog reset: safe mode; a power-on clears it."""
    root = flash(tmp_path, boots=2)
    with VDev(root) as d:
        assert wait_console(d, "net:")
        assert (root / "store" / "boots").read_text() == "0"  # power-on: counting starts again
        (root / "store" / "boots").write_text("2")  # as after two crashes in a row
        # a watchdog reset is the third crash in a row: the app must not start again
        try:
            d.mpremote("resume", "exec", "import machine\nw = machine.WDT(timeout=200)\n"
                       "import time\ntime.sleep(3)", check=False, timeout=4)
        except subprocess.TimeoutExpired:
            pass  # the module reset under mpremote
        assert wait_console(d, "SAFE MODE")
        assert (root / "store" / "boots").read_text() == "3"
        out = d.exec("print(safe_mode, 'app' in dir())")
        assert out.split() == ["True", "False"]
    os.remove(str(root) + ".console")
    with VDev(root) as d:  # power cycle: counting starts again, the app runs
        assert wait_console(d, "net:")
        assert (root / "store" / "boots").read_text() == "0"
        assert "SAFE MODE" not in d.console()


def test_corrupt_config_and_metrics_files_do_not_crash_the_app(tmp_path):
    """Damaged ovms.cfg and metrics.dat: the app still boots (no abnormal boot counted) and
    the damaged config is moved aside."""
    root = flash(tmp_path)
    # a corrupt persisted-metrics file must not crash the app; a corrupt config neither
    (root / "store" / "ovms.cfg").write_bytes(b"\x00garbage\xff" * 20)
    (root / "store" / "metrics.dat").write_bytes(b"\xff" * 100)
    with VDev(root) as d:
        assert wait_console(d, "net:")
        assert "corrupt" in d.console().lower() or "damaged" in d.console().lower()
        assert (root / "store" / "boots").read_text() == "0"
        names = os.listdir(root / "store")
        assert any(n.startswith("ovms.cfg.corrupt") for n in names)
