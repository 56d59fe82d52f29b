"""Firmware recipe: partition tables, board config, frozen manifest, frozen size budget, flash tool."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

import deploy
import flash
from util import LIB, MPY_CROSS, REPO, TOOLS

FW = os.path.join(REPO, "firmware")
BOARD = os.path.join(FW, "boards", "MICRO_OVMS")
TABLES = {"partitions.csv": 4 << 20, "partitions-8MiB.csv": 8 << 20}
FROZEN_BUDGET = 160 * 1024      # .mpy bytes (xtensawin) frozen into the 1.5 MiB slot
TYPES = {"app": 0, "data": 1}


def parse_partitions(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, typ, sub, off, size = [x.strip() for x in line.split(",")[:5]]
            rows.append((name, typ, sub, int(off, 0), int(size, 0)))
    return rows


@pytest.mark.parametrize("table", sorted(TABLES))
def test_partition_table_has_two_ota_slots_and_fits_the_flash(table):
    rows = parse_partitions(os.path.join(BOARD, table))
    names = [r[0] for r in rows]
    assert names == ["nvs", "otadata", "phy_init", "ota_0", "ota_1", "vfs"]
    by = {r[0]: r for r in rows}
    assert by["otadata"][1:3] == ("data", "ota") and by["otadata"][4] == 0x2000
    assert by["ota_0"][1:3] == ("app", "ota_0") and by["ota_1"][1:3] == ("app", "ota_1")
    assert by["ota_0"][4] == by["ota_1"][4] >= 0x180000          # same size, >= 1.5 MiB
    assert by["vfs"][1] == "data"
    end = 0x9000                                                 # after the partition table
    for name, typ, sub, off, size in rows:
        assert off >= end, "%s overlaps the previous partition" % name
        assert off % (0x10000 if typ == "app" else 0x1000) == 0, "%s misaligned" % name
        assert size % 0x1000 == 0
        end = off + size
    assert end <= TABLES[table], "does not fit the flash"
    assert end == TABLES[table], "flash left unused"
    # the filesystem holds config + deployed app + two OTA app slots
    assert by["vfs"][4] >= 4 * FROZEN_BUDGET + 256 * 1024


def test_virtual_board_partition_table_matches_the_real_one():
    sys.path.insert(0, os.path.join(TOOLS, "vboard"))
    try:
        import esp32
    finally:
        sys.path.pop(0)
    rows = parse_partitions(os.path.join(BOARD, "partitions.csv"))
    subtypes = {"nvs": 2, "ota": 0, "phy": 1, "ota_0": 0x10, "ota_1": 0x11, "fat": 0x81}
    assert [(r[0], TYPES[r[1]], subtypes[r[2]], r[3], r[4]) for r in rows] == list(esp32.TABLE)


def _config(name):
    with open(os.path.join(BOARD, name)) as f:
        return f.read()


def test_board_config_enables_can_rollback_and_the_partition_tables():
    h = _config("mpconfigboard.h")
    assert re.search(r"#define MICROPY_HW_ENABLE_CAN\s+\(1\)", h)
    assert re.search(r"MICROPY_HW_CAN1_TX", h) and re.search(r"MICROPY_HW_CAN1_RX", h)
    assert re.search(r"#define MICROPY_PY_BUILTINS_POW3\s+\(1\)", h)
    sdk = _config("sdkconfig.board")
    assert "CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE=y" in sdk
    assert "CONFIG_PARTITION_TABLE_CUSTOM=y" in sdk
    cmake = _config("mpconfigboard.cmake")
    assert "set(IDF_TARGET esp32)" in cmake and "sdkconfig.board" in cmake
    assert "sdkconfig.flash8m" in cmake and os.path.exists(os.path.join(BOARD, "sdkconfig.flash8m"))
    # the table names the sdkconfig fragments use are the ones build.sh copies into the port
    with open(os.path.join(FW, "build.sh")) as f:
        build = f.read()
    for frag, table in (("sdkconfig.board", "partitions.csv"),
                        ("sdkconfig.flash8m", "partitions-8MiB.csv")):
        name = re.search(r'CONFIG_PARTITION_TABLE_CUSTOM_FILENAME="([^"]+)"', _config(frag))
        assert name, frag
        assert re.search(r"%s\s*\\?\s*ports/esp32/%s" % (re.escape(table),
                                                          re.escape(name.group(1))), build), \
            "build.sh must copy %s to ports/esp32/%s" % (table, name.group(1))
    assert "FROZEN_MANIFEST=/src/firmware/manifest.py" in build
    assert "pull/19461" in build                  # machine.CAN for esp32
    assert re.search(r"espressif/idf:v5\.(4|5|6)", build)   # ESP-IDF >= 5.4


def _run_manifest():
    """Execute firmware/manifest.py like MicroPython's manifest tool does (cwd = its dir)."""
    calls = []
    g = {
        "include": lambda p, **k: calls.append(("include", p, None)),
        "require": lambda n, **k: calls.append(("require", n, None)),
        "module": lambda p, base_path=".", opt=None: calls.append(("module", p, base_path)),
        "package": lambda p, files=None, base_path=".", opt=None: calls.append(
            ("package", p, base_path)),
        "freeze": lambda p, script=None, opt=None: calls.append(("freeze", p, script)),
        "metadata": lambda **k: None, "options": None,
    }
    cwd = os.getcwd()
    os.chdir(FW)
    try:
        with open("manifest.py") as f:
            exec(compile(f.read(), "manifest.py", "exec"), g)
        return [(k, p, os.path.abspath(b) if b else None) for k, p, b in calls]
    finally:
        os.chdir(cwd)


def test_frozen_manifest_references_existing_files_and_covers_lib():
    calls = _run_manifest()
    assert ("include", "$(PORT_DIR)/boards/manifest.py", None) in calls
    frozen = set()
    for kind, p, base in calls:
        if kind in ("module", "package"):
            path = os.path.join(base, p)
            assert os.path.exists(path), path
            frozen.add(os.path.relpath(path, REPO))
    assert {"boot.py", "main.py", "lib/ota_boot.py", "lib/ovms"} <= frozen
    for name in os.listdir(LIB):
        if name.endswith(".py") or os.path.exists(os.path.join(LIB, name, "__init__.py")):
            assert "lib/" + name in frozen, name


def test_frozen_app_fits_the_size_budget():
    with tempfile.TemporaryDirectory() as tmp:
        lib = deploy.gather(REPO, os.path.join(tmp, "lib"))
        out = deploy.compile_lib(lib, os.path.join(tmp, "mpy"), "xtensawin")
        sizes = {rel: os.path.getsize(p) for rel, p in out if rel.endswith(".mpy")}
    for src in ("boot.py", "main.py"):
        with tempfile.NamedTemporaryFile(suffix=".mpy") as t:
            subprocess.run([MPY_CROSS, "-march=xtensawin", "-o", t.name,
                            os.path.join(REPO, src)], check=True)
            sizes[src] = os.path.getsize(t.name)
    total = sum(sizes.values())
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    print("frozen app: %d modules, %d bytes of .mpy (budget %d); largest %s"
          % (len(sizes), total, FROZEN_BUDGET, biggest))
    assert total <= FROZEN_BUDGET, "frozen app %d bytes > budget %d" % (total, FROZEN_BUDGET)


# -- ovms.py flash (tools/flash.py) ----------------------------------------------------------------

def flash_cli(argv):
    """tools/ovms.py main (loaded by path: "ovms" is also the device package's name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ovms_host_cli_fw", os.path.join(TOOLS, "ovms.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.main(argv)


def _image(path, chip_id):
    head = bytearray(b"\xe9\x03\x02\x20" + b"\0" * 12)
    head[12] = chip_id & 0xFF
    head[13] = chip_id >> 8
    with open(path, "wb") as f:
        f.write(bytes(head) + b"\0" * 1000)
    return path


FAKE_ESPTOOL = """#!/bin/sh
echo "$@" >> "%s"
case "$*" in
  *chip-id*) printf 'Connecting....\\nConnected to %s on $3:\\nChip type:          %s\\n' ;;
esac
"""


@pytest.mark.parametrize("chip,desc,offset", [
    ("ESP32", "ESP32-D0WD-V3 (revision v3.1)", "0x1000"),
    ("ESP32-S3", "ESP32-S3 (QFN56) (revision v0.2)", "0x0"),
    ("ESP32-C3", "ESP32-C3 (QFN32) (revision v0.4)", "0x0"),
])
def test_flash_detects_the_chip_and_writes_at_its_offset(tmp_path, chip, desc, offset):
    log = str(tmp_path / "calls")
    tool = str(tmp_path / "esptool")
    with open(tool, "w") as f:
        f.write(FAKE_ESPTOOL % (log, chip, desc))
    os.chmod(tool, 0o755)
    key = chip.replace("-", "").lower()
    img = _image(str(tmp_path / "fw.bin"), flash.CHIPS[key][0])
    assert flash_cli(["flash", "--port", "/dev/ttyFAKE", "--image", img, "--esptool", tool]) == 0
    calls = open(log).read().splitlines()
    assert calls[0] == "--port /dev/ttyFAKE chip-id"
    assert calls[1] == "--chip %s --port /dev/ttyFAKE --baud 460800 erase-flash" % key
    assert calls[2] == "--chip %s --port /dev/ttyFAKE --baud 460800 write-flash -z %s %s" % (
        key, offset, img)


def test_flash_refuses_an_image_for_another_chip_or_no_image(tmp_path, capsys):
    log = str(tmp_path / "calls")
    tool = str(tmp_path / "esptool")
    with open(tool, "w") as f:
        f.write(FAKE_ESPTOOL % (log, "ESP32-S3", "ESP32-S3 (QFN56)"))
    os.chmod(tool, 0o755)
    img = _image(str(tmp_path / "fw.bin"), 0)                 # built for the classic ESP32
    assert flash_cli(["flash", "--port", "/dev/ttyFAKE", "--image", img, "--esptool", tool]) == 1
    assert "holds an esp32s3 but the image is for esp32" in capsys.readouterr().err
    assert len(open(log).read().splitlines()) == 1            # nothing written
    assert flash_cli(["flash", "--port", "/dev/ttyFAKE", "--image", str(tmp_path / "none.bin")]) == 2
    with open(str(tmp_path / "junk.bin"), "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(SystemExit, match="not an ESP32 flash image"):
        flash_cli(["flash", "--port", "/dev/ttyFAKE", "--image", str(tmp_path / "junk.bin"),
                    "--esptool", tool])


def test_flash_parses_esptool_v4_and_v5_output():
    assert flash.parse_chip("Connected to ESP32-C6 on /dev/ttyACM0:") == "esp32c6"
    assert flash.parse_chip("Detecting chip type... ESP32\nChip is ESP32-D0WD-V3") == "esp32"
    assert flash.parse_chip("Chip type:          ESP32-C61 (revision v1.0)") == "esp32c61"
    assert flash.parse_chip("A fatal error occurred: Failed to connect") is None
