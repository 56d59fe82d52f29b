"""Every device module must cross-compile for the ESP32 (xtensawin), viper included."""
import glob
import os
import subprocess

import pytest

from util import MPY_CROSS, REPO

SOURCES = sorted(glob.glob(os.path.join(REPO, "lib", "**", "*.py"), recursive=True)
                 + [os.path.join(REPO, "boot.py"), os.path.join(REPO, "main.py")])


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: os.path.relpath(p, REPO))
def test_compiles_for_esp32(src, tmp_path):
    out = tmp_path / "x.mpy"
    r = subprocess.run([MPY_CROSS, "-march=xtensawin", "-o", str(out), src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
