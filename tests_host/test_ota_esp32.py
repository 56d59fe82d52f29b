"""Firmware OTA through esp32.Partition: the virtual board's file-backed emulation (block device,
set_boot, bootloader rollback) and the signed firmware path (stage, switch, commit, roll back)."""
import hashlib
import json
import os
import signal
import subprocess

import pytest

import cli_ota
from test_ota_helpers import VBOARD, device, device_cmd, flash_root, keypair, lines
from util import run_mpy

SLOT = 0x180000


def _emu(tmp_path, code):
    env_dir = str(tmp_path / "esp32")
    os.environ["VBOARD_ESP32"] = env_dir
    try:
        return run_mpy("import os\n" + code, path=(VBOARD,)).stdout.splitlines()
    finally:
        del os.environ["VBOARD_ESP32"]


def test_partition_emulation_block_device_and_info(tmp_path):
    out = _emu(tmp_path, """
import esp32
P = esp32.Partition
run = P(P.RUNNING)
print(run.info())
nxt = run.get_next_update()
print(nxt.info()[4], nxt.ioctl(4, 0), nxt.ioctl(5, 0))
print([p.info()[4] for p in P.find(P.TYPE_APP)], [p.info()[4] for p in P.find(P.TYPE_DATA)])
b = bytearray(4096)
nxt.readblocks(3, b)
print(b == b"\\xff" * 4096)
nxt.writeblocks(3, b"\\x0f" * 4096)
nxt.readblocks(3, b)
print(b[0], b[4095])
nxt.writeblocks(3, b"\\xf3" * 16, 100)          # NOR: programming only clears bits
r = bytearray(16)
nxt.readblocks(3, r, 100)
print(r[0])
nxt.ioctl(6, 3)
nxt.readblocks(3, b)
print(b == b"\\xff" * 4096)
try:
    nxt.writeblocks(nxt.ioctl(4, 0), b)
except OSError as e:
    print("past end", e)
try:
    nxt.get_next_update()
except OSError as e:
    print("not running", e)
try:
    P("nope")
except OSError as e:
    print("missing", e)
""")
    assert out[0] == "(0, 16, 65536, %d, 'ota_0', False)" % SLOT
    assert out[1] == "ota_1 %d 4096" % (SLOT // 4096)
    assert out[2] == "['ota_0', 'ota_1'] ['nvs', 'otadata', 'phy_init', 'vfs']"
    assert out[3:7] == ["True", "15 15", "3", "True"]
    assert out[7].startswith("past end") and out[8].startswith("not running")
    assert out[9].startswith("missing")


def test_bootloader_rollback_and_confirm(tmp_path):
    boot = """
import esp32
P = esp32.Partition
print(P(P.RUNNING).info()[4])
"""
    switch = boot + """
n = P(P.RUNNING).get_next_update()
try:
    n.set_boot()
except OSError as e:
    print("invalid", e)
n.writeblocks(0, b"\\xe9" + b"\\x00" * 4095)
n.set_boot()
print("boot", P(P.BOOT).info()[4])
"""
    assert _emu(tmp_path, switch) == ["ota_0", "invalid -5379", "boot ota_1"]
    assert _emu(tmp_path, boot) == ["ota_1"]        # new image boots, pending verification
    assert _emu(tmp_path, boot) == ["ota_0"]        # never confirmed: rolled back
    assert _emu(tmp_path, boot) == ["ota_0"]
    assert _emu(tmp_path, switch)[-1] == "boot ota_1"
    assert _emu(tmp_path, boot + "P.mark_app_valid_cancel_rollback()\n") == ["ota_1"]
    assert _emu(tmp_path, boot) == ["ota_1"]        # confirmed: stays
    assert _emu(tmp_path, boot) == ["ota_1"]


def _image(tmp_path, n=200 * 1024, seed=1):
    data = b"\xe9" + hashlib.sha256(b"%d" % seed).digest() * (n // 32)
    p = str(tmp_path / ("fw%d.bin" % seed))
    with open(p, "wb") as f:
        f.write(data[:n])
    return p, data[:n]


def _bundle_file(tmp_path, bundle, name):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(bundle)
    return p


def _fw_state(root):
    with open(os.path.join(root, "ota", "state.json")) as f:
        return json.load(f).get("fw")


def test_firmware_update_switches_partition_and_commits_when_healthy(tmp_path):
    root = flash_root(tmp_path)
    img, data = _image(tmp_path)
    b = cli_ota.firmware_bundle(img, keypair()[2], "fw-2")
    p = _bundle_file(tmp_path, b, "fwb.bin")
    rc, out = device(root, "firmware", "push", p, cli_ota.bundle_id(b), "1024", "firmware")
    assert lines(out, "PART") == ["ota_0", "ota_0"]
    assert lines(out, "STAGED") == ["fw-2"], out
    with open(str(tmp_path / "esp32" / "ota_1.bin"), "rb") as f:
        assert f.read(len(data)) == data
    assert _fw_state(root) == {"ver": "fw-2", "label": "ota_1", "st": "staged"}
    rc, out = device(root, "boot", "firmware", "status")
    assert lines(out, "PART") == ["ota_1"] and lines(out, "BOOT")[0].endswith("True")
    st = json.loads(lines(out, "STATUS")[0])
    assert st["firmware"] == "ota_1" and st["fw"]["st"] == "trial" and st["trial"]
    rc, out = device(root, "boot", "healthy")               # rolled back: not healthy in time
    assert lines(out, "BOOT")[0].endswith("False")
    rc, out = device(root, "boot", "firmware", "status")
    assert lines(out, "PART") == ["ota_0"]
    assert json.loads(lines(out, "STATUS")[0])["fail"] == \
        "firmware fw-2 did not report healthy: rolled back"
    # again, and this time the new firmware reports healthy
    rc, out = device(root, "push", p, cli_ota.bundle_id(b), "1024")
    assert lines(out, "STAGED") == ["fw-2"], out
    rc, out = device(root, "boot", "healthy", "firmware")
    assert lines(out, "PART") == ["ota_1"] and lines(out, "HEALTHY") == ["True"]
    for _ in range(2):
        rc, out = device(root, "boot", "firmware")
        assert lines(out, "PART") == ["ota_1"] and lines(out, "BOOT")[0].endswith("False")
    assert _fw_state(root) == {"ver": "fw-2", "label": "ota_1", "st": "ok"}


def test_firmware_crash_before_health_rolls_back(tmp_path):
    root = flash_root(tmp_path)
    img, data = _image(tmp_path, 64 * 1024)
    b = cli_ota.firmware_bundle(img, keypair()[2], "fw-bad")
    p = _bundle_file(tmp_path, b, "fwb.bin")
    device(root, "push", p, cli_ota.bundle_id(b), "1024")
    rc, out = device(root, "boot", "firmware", "crash")
    assert rc == 99 and lines(out, "PART") == ["ota_1"]
    rc, out = device(root, "boot", "firmware", "healthy")
    assert lines(out, "PART") == ["ota_0"]


@pytest.mark.parametrize("case", ["not_an_image", "oversized", "wrong_hash", "wrong_key"])
def test_bad_firmware_bundles_are_refused(tmp_path, case):
    root = flash_root(tmp_path)
    key = keypair()[2]
    img, data = _image(tmp_path, 32 * 1024)
    if case == "not_an_image":
        b = cli_ota.make_bundle("firmware", "x", [("firmware.bin", b"\x00" + data[1:])], key)
        want = "firmware image rejected by set_boot"
    elif case == "oversized":
        b = cli_ota.make_bundle("firmware", "x", [("firmware.bin", data * 50)], key)
        want = "oversized firmware: %d bytes, partition ota_1 holds %d" % (len(data) * 50, SLOT)
    elif case == "wrong_hash":
        b = cli_ota.make_bundle("firmware", "x", [("firmware.bin", data)], key)
        b = b[:-10] + bytes([b[-10] ^ 1]) + b[-9:]
        want = "hash mismatch for the firmware image"
    else:
        b = cli_ota.make_bundle("firmware", "x", [("firmware.bin", data)], keypair("other")[2])
        want = "signature verification failed"
    p = _bundle_file(tmp_path, b, "bad.bin")
    rc, out = device(root, "push", p, cli_ota.bundle_id(b), "1024", "firmware")
    assert len(lines(out, "ERR")) == 1 and lines(out, "ERR")[0].startswith(want), out
    assert lines(out, "PART") == ["ota_0"]
    rc, out = device(root, "boot", "firmware")
    assert lines(out, "PART") == ["ota_0"]                 # still the old firmware
    assert not (_fw_state(root) if os.path.exists(os.path.join(root, "ota", "state.json"))
                else None)


def test_host_refuses_a_merged_flash_image(tmp_path):
    p = str(tmp_path / "merged.bin")
    with open(p, "wb") as f:
        f.write(b"\xff" * 4096)
    with pytest.raises(cli_ota.PushError, match="not an ESP32 app image"):
        cli_ota.firmware_bundle(p, keypair()[2])


def test_firmware_transfer_resumes_after_power_cuts(tmp_path):
    """Cut the power repeatedly during the firmware transfer: it resumes from the last saved
    64 KiB boundary, and the image that finally boots is complete."""
    root = flash_root(tmp_path)
    img, data = _image(tmp_path, 300 * 1024, seed=7)
    b = cli_ota.firmware_bundle(img, keypair()[2], "fw-7")
    p = _bundle_file(tmp_path, b, "fwb.bin")
    bid = cli_ota.bundle_id(b)
    resumed = []
    for cut in (90, 40, 75):                               # chunks into each power-on
        cmd, env = device_cmd(root, "push", p, bid, "1024")
        pr = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        n = 0
        for line in pr.stdout:
            if line.startswith("RESUME"):
                resumed.append(int(line.split()[1]))
            if line.startswith("M xfer"):
                n += 1
                if n == cut:
                    pr.send_signal(signal.SIGKILL)
                    break
        pr.communicate()
    rc, out = device(root, "push", p, bid, "1024")
    resumed += [int(x) for x in lines(out, "RESUME")]
    assert lines(out, "STAGED") == ["fw-7"], out
    hl = len(b) - len(data)
    assert len(resumed) == 3 and all(r > hl and (r - hl) % 65536 == 0 for r in resumed), resumed
    rc, out = device(root, "boot", "healthy", "firmware")
    assert lines(out, "PART") == ["ota_1"]
    with open(str(tmp_path / "esp32" / "ota_1.bin"), "rb") as f:
        assert f.read(len(data)) == data
