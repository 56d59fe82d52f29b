"""make deploy: lib/ compiled with mpy-cross and copied with mpremote to a (virtual) module; the
package.json that `mpremote mip install` uses."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import deploy
import mkpackage
from util import LIB, REPO, VDev


def _source(tmp_path, version):
    """A copy of this repo's app (lib/, boot.py, main.py, vehicles) with another version."""
    src = tmp_path / "src"
    shutil.copytree(LIB, src / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "firmware", "vehicles"), src / "firmware" / "vehicles",
                    ignore=shutil.ignore_patterns("logs"))
    for f in ("boot.py", "main.py"):
        shutil.copy(os.path.join(REPO, f), src)
    init = src / "lib" / "ovms" / "__init__.py"
    init.write_text(re.sub(r'^VERSION = .*$', 'VERSION = "%s"' % version, init.read_text(),
                           flags=re.M))
    return str(src)


def test_build_compiles_lib_and_vehicles_keeps_entry_points_as_source(tmp_path):
    out = deploy.build(REPO, str(tmp_path / "deploy"), march="xtensawin")
    files = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    assert "boot.py" in files and "main.py" in files
    lib = [f for f in files if f.startswith("lib/") and f != "lib/.qstrs"]
    assert not [f for f in lib if f.endswith(".py")]                  # all compiled
    with open(os.path.join(out, "lib", ".qstrs")) as fh:               # names for ota_boot
        names = fh.read().splitlines()
    assert {"ovms", "VERSION", "select", "mark_healthy"} <= set(names)
    assert len(names) == len(set(names))
    want = {"lib/" + f[:-3] + ".mpy" for f in deploy.lib_files(LIB) if f.endswith(".py")}
    assert want <= set(lib)
    assert {"lib/veh_kn.mpy", "lib/veh_rv.mpy"} <= set(lib)           # generated vehicle modules
    for f in lib:
        with open(os.path.join(out, f), "rb") as fh:
            head = fh.read(4)
        assert head[:2] == b"M\x06", f                                 # .mpy v6
        assert head[2] >> 2 in (0, 10), f                              # bytecode or xtensawin


def test_mpremote_command_cleans_copies_selects_and_resets(tmp_path):
    out = deploy.build(REPO, str(tmp_path / "deploy"), march="xtensawin")
    c = deploy.mpremote_cmd(out, "/dev/ttyUSB0")
    assert c[1:4] == ["connect", "/dev/ttyUSB0", "exec"]
    steps = " ".join(x for x in c if "\n" not in x).split(" + ")
    assert steps[1].startswith("fs cp -r ") and steps[1].endswith(" :/lib/")
    assert steps[2] == "fs cp %s/boot.py %s/main.py :/" % (out, out)
    assert steps[-1] == "soft-reset"
    assert "'/lib/ovms'" in c[4] and "'/lib/ota_boot.py'" in c[4]    # stale sources removed


def _mp(d, code):
    return d.exec(code, resume=False, timeout=120)


def test_deploy_to_a_fresh_virtual_device(tmp_path):
    """A virtual device with an empty flash and no frozen app: deploy installs and boots the app,
    keeps the configuration, and makes the deployed app the one that runs over an OTA slot."""
    root = tmp_path / "flash"
    (root / "store").mkdir(parents=True)          # empty flash apart from the config store
    (root / "store" / "keep.txt").write_text("config")
    (root / "ota").mkdir()
    (root / "ota" / "state.json").write_text(json.dumps({"run": "a", "prev": "f"}))
    d = VDev(root, extra=("--no-frozen",)).start()
    try:
        src = _source(tmp_path, "7.7.7-deploy")
        r = subprocess.run([sys.executable,
                            os.path.join(REPO, "tools", "ovms.py"), "deploy", "--port", d.pty,
                            "--arch", "auto", "--source", src],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "device code architecture x64" in r.stderr
        time.sleep(1)
        out = _mp(d, "import os, sys, json, ovms, ota_boot\n"
                     "print('V', ovms.VERSION)\n"
                     "print('S', json.dumps(ota_boot.load()))\n"
                     "print('F', sorted(os.listdir('/lib/ovms'))[:3], len(os.listdir('/lib')))\n")
        assert "V 7.7.7-deploy" in out, out + d.console()
        st = json.loads(out.split("S ", 1)[1].split("\n")[0])
        assert st["run"] == "f" and st["prev"] == "a"
        assert "'__init__.mpy'" in out
        assert (root / "store" / "keep.txt").read_text() == "config"
        assert (root / "boot.py").read_text() == open(os.path.join(REPO, "boot.py")).read()
        assert not list((root / "lib").rglob("*.py"))
        assert (root / "lib" / "veh_kn.mpy").exists()
        # a second deploy (a file removed from lib/) leaves no stale module behind
        os.remove(os.path.join(src, "lib", "ovms", "shell", "vehicle.py"))
        r = subprocess.run([sys.executable,
                            os.path.join(REPO, "tools", "ovms.py"), "deploy", "--port", d.pty,
                            "--arch", "x64", "--source", src],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert not (root / "lib" / "ovms" / "shell" / "vehicle.mpy").exists()
        assert (root / "lib" / "ovms" / "shell" / "__init__.mpy").exists()
    finally:
        d.stop()


def test_package_json_lists_every_lib_file_and_is_current():
    with open(os.path.join(REPO, "package.json")) as f:
        pkg = json.load(f)
    assert pkg == mkpackage.package(), "package.json is out of date: run make package"
    with open(os.path.join(REPO, "package.json")) as f:
        assert f.read() == mkpackage.text()
    got = {dst: src for dst, src in pkg["urls"]}
    assert set(got) == set(deploy.lib_files(LIB))
    for dst, src in got.items():
        assert src == "lib/" + dst and os.path.isfile(os.path.join(REPO, src))


def test_mip_installs_the_package_on_a_virtual_device(tmp_path):
    root = tmp_path / "flash"
    (root / "store").mkdir(parents=True)
    d = VDev(root, extra=("--no-frozen",)).start()
    try:
        r = d.mpremote("mip", "install", "--target", "/lib",
                       os.path.join(REPO, "package.json"), timeout=300)
        assert "Installing: /lib/ovms/__init__.py" in r.stdout
        with open(os.path.join(REPO, "package.json")) as f:
            urls = json.load(f)["urls"]
        for dst, src in urls:
            with open(os.path.join(REPO, src), "rb") as a, open(root / "lib" / dst, "rb") as b:
                assert a.read() == b.read(), dst
    finally:
        d.stop()
