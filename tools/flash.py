"""flash: write the micro-ovms firmware with esptool (detect the chip, erase, write at its offset)."""
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "build", "firmware", "firmware.bin")

# esptool chip name -> (chip id in the image header, offset of the merged image/bootloader);
# taken from esptool's own target definitions when it is installed.
CHIPS = {
    "esp32": (0, 0x1000), "esp32s2": (2, 0x1000), "esp32c3": (5, 0x0), "esp32s3": (9, 0x0),
    "esp32c2": (12, 0x0), "esp32c6": (13, 0x0), "esp32h2": (16, 0x0), "esp32p4": (18, 0x2000),
    "esp32c5": (23, 0x2000), "esp32c61": (20, 0x0),
}
try:
    from esptool.targets import CHIP_DEFS
    CHIPS = {k: (c.IMAGE_CHIP_ID, c.BOOTLOADER_FLASH_OFFSET) for k, c in CHIP_DEFS.items()
             if getattr(c, "IMAGE_CHIP_ID", None) is not None}
except ImportError:
    pass


def esptool():
    p = os.path.join(os.path.dirname(sys.executable), "esptool")
    return p if os.path.exists(p) else (shutil.which("esptool") or shutil.which("esptool.py")
                                        or "esptool")


def parse_chip(text):
    """esptool name ("esp32s3") of the chip in `esptool chip-id` output, or None."""
    m = (re.search(r"Connected to (ESP32[-A-Z0-9]*) on", text)
         or re.search(r"Detecting chip type\.*\s*(ESP32[-A-Z0-9]*)", text)
         or re.search(r"Chip (?:is|type:)\s*(ESP32[-A-Z0-9]*)", text))
    if not m:
        return None
    fam = m.group(1).replace("-", "").lower()       # ESP32-D0WD-V3 -> esp32d0wdv3
    best = None
    for chip in CHIPS:                              # longest known prefix: esp32c61 > esp32c6
        if fam.startswith(chip) and (best is None or len(chip) > len(best)):
            best = chip
    return best


def image_chip(path):
    """esptool chip name an ESP image (merged firmware or bootloader) was built for."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16 or head[0] != 0xE9:
        raise SystemExit("flash: %s is not an ESP32 flash image (no 0xE9 magic byte)" % path)
    cid = head[12] | head[13] << 8
    for chip, (i, _) in CHIPS.items():
        if i == cid:
            return chip
    raise SystemExit("flash: %s is for an unknown chip (id %d)" % (path, cid))


def commands(port, chip, image, baud=460800, erase=True, tool=None):
    """The esptool command lines that flash `image` onto a `chip` on `port`."""
    base = [tool or esptool(), "--chip", chip, "--port", port, "--baud", str(baud)]
    off = CHIPS[chip][1]
    cmds = [base + ["erase-flash"]] if erase else []
    cmds.append(base + ["write-flash", "-z", hex(off), image])
    return cmds


def run(a):
    """`ovms.py flash` (a: port, image, baud, no_erase, esptool, dry_run)."""
    a.image = a.image or IMAGE
    if not os.path.exists(a.image):
        print("flash: no image at %s: build it with `make firmware`" % a.image, file=sys.stderr)
        return 2
    want = image_chip(a.image)
    tool = a.esptool or esptool()
    r = subprocess.run([tool, "--port", a.port, "chip-id"], capture_output=True, text=True)
    chip = parse_chip(r.stdout + r.stderr)
    if r.returncode or not chip:
        print("flash: cannot detect the chip on %s:\n%s" % (a.port, (r.stdout + r.stderr)[-2000:]),
              file=sys.stderr)
        return 1
    if chip != want:
        print("flash: %s holds an %s but the image is for %s" % (a.port, chip, want),
              file=sys.stderr)
        return 1
    print("flash: %s on %s, image at %s" % (chip, a.port, hex(CHIPS[chip][1])), file=sys.stderr)
    for c in commands(a.port, chip, a.image, a.baud, not a.no_erase, tool):
        print("+ " + " ".join(c), file=sys.stderr)
        if not a.dry_run and subprocess.run(c).returncode:
            print("flash: esptool failed", file=sys.stderr)
            return 1
    if not a.no_erase and not a.dry_run:
        print("flash: done; the filesystem is empty: run `make deploy PORT=%s` if the app is "
              "not frozen, then provision" % a.port, file=sys.stderr)
    return 0

