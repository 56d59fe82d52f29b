"""esp32 for the virtual board: Partition backed by files, with the ESP-IDF OTA bootloader's rollback."""
import os
import json

# Partition files live in DIR (one sparse <label>.bin each, plus otadata.json): VBOARD_ESP32 if
# set (a host path), else /.esp32 inside the mounted flash. The bootloader step (rollback of an
# unconfirmed image) runs at the first use in a process, i.e. once per boot, after the mount.
DIR = os.getenv("VBOARD_ESP32") or "/.esp32"
BLOCK = 4096
# Mirrors firmware/boards/MICRO_OVMS/partitions.csv (4 MiB): label, type, subtype, offset, size.
TABLE = (
    ("nvs", 1, 0x02, 0x9000, 0x4000),
    ("otadata", 1, 0x00, 0xD000, 0x2000),
    ("phy_init", 1, 0x01, 0xF000, 0x1000),
    ("ota_0", 0, 0x10, 0x10000, 0x180000),
    ("ota_1", 0, 0x11, 0x190000, 0x180000),
    ("vfs", 1, 0x81, 0x310000, 0xF0000),
)
ESP_ERR_OTA_VALIDATE_FAILED = 0x1503
ESP_ERR_NOT_FOUND = 0x105
_running = None


def _mkdir(d):
    p = ""
    for part in d.split("/"):
        if part:
            p += "/" + part
            try:
                os.mkdir(p)
            except OSError:
                pass


def _otadata():
    try:
        with open(DIR + "/otadata.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"boot": "ota_0", "st": {"ota_0": "valid"}}


def _save(d):
    _mkdir(DIR)
    with open(DIR + "/otadata.tmp", "w") as f:
        json.dump(d, f)
    os.rename(DIR + "/otadata.tmp", DIR + "/otadata.json")


def _other(label):
    return "ota_1" if label == "ota_0" else "ota_0"


def _run():
    """Label of the running app partition (runs the bootloader step on first use)."""
    global _running
    if _running is None:
        _running = _bootloader()
    return _running


def _bootloader():
    """What the second-stage bootloader does at power-on: pick the image, roll back if unconfirmed."""
    d = _otadata()
    b = d["boot"]
    st = d["st"]
    if st.get(b) == "pending" or (st.get(b) == "new" and not Partition(b)._valid()):
        st[b] = "aborted"           # booted before but never marked valid (or invalid image)
        b = d["boot"] = _other(b)
    elif st.get(b) == "new":
        st[b] = "pending"
    _save(d)
    return b


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=BLOCK):
        if id == Partition.RUNNING:
            id = _run()
        elif id == Partition.BOOT:
            _run()
            id = _otadata()["boot"]
        for row in TABLE:
            if row[0] == id:
                self._row = row
                break
        else:
            raise OSError(-ESP_ERR_NOT_FOUND)
        self._bs = block_size

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=BLOCK):
        return [Partition(r[0], block_size) for r in TABLE
                if r[1] == type and subtype in (0xFF, r[2]) and label in (None, r[0])]

    def info(self):
        r = self._row
        return (r[1], r[2], r[3], r[4], r[0], False)

    def __repr__(self):
        r = self._row
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            r[1], r[2], r[3], r[4], r[0])

    def _file(self):
        return DIR + "/" + self._row[0] + ".bin"

    def _read(self, addr, n):
        b = bytearray(n)
        self._readinto(addr, b)
        return b

    def _readinto(self, addr, buf):
        # into the caller's buffer: the board's flash reads take no heap, nor may this
        k = 0
        try:
            with open(self._file(), "rb") as f:
                f.seek(addr)
                k = f.readinto(buf) or 0
        except OSError:
            pass
        for i in range(k, len(buf)):
            buf[i] = 0xFF

    def _write(self, addr, b):
        if addr < 0 or addr + len(b) > self._row[4]:
            raise OSError(22)   # EINVAL: outside the partition
        _mkdir(DIR)
        try:
            f = open(self._file(), "r+b")
        except OSError:
            f = open(self._file(), "wb")
        with f:
            f.seek(addr)
            f.write(b)

    def _valid(self):
        return self._read(0, 1) == b"\xe9"      # ESP image magic

    def readblocks(self, block, buf, offset=0):
        self._readinto(block * self._bs + offset, buf)

    def writeblocks(self, block, buf, offset=None):
        addr = block * self._bs
        if offset is None:                      # erase the blocks, then program
            if len(buf) % self._bs:
                raise OSError(22)
            self._write(addr, buf)              # no copy: the board's flash writes take no heap
        else:                                   # NOR flash: programming only clears bits
            old = self._read(addr + offset, len(buf))
            for i in range(len(old)):
                old[i] &= buf[i]
            self._write(addr + offset, old)

    def ioctl(self, op, arg):
        if op == 4:
            return self._row[4] // self._bs
        if op == 5:
            return self._bs
        if op == 6:
            self._write(arg * self._bs, b"\xff" * self._bs)
        return 0

    def set_boot(self):
        if self._row[1] != 0:
            raise OSError(22)
        run = _run()
        d = _otadata()
        lab = self._row[0]
        if lab != run:
            if not self._valid():
                raise OSError(-ESP_ERR_OTA_VALIDATE_FAILED)
            d["st"][lab] = "new"
        d["boot"] = lab
        _save(d)

    def get_next_update(self):
        if self._row[0] != _run():
            raise OSError(-ESP_ERR_NOT_FOUND)
        return Partition(_other(self._row[0]))

    @staticmethod
    def mark_app_valid_cancel_rollback():
        run = _run()
        d = _otadata()
        d["st"][run] = "valid"
        _save(d)

