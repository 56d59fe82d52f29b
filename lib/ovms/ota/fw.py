"""ota.fw: writes a firmware image into the next OTA partition (esp32.Partition), then set_boot."""
import hashlib
from micropython import const
import ota_boot
from ovms.ota.fs import OTAError, hexs

_BLK = const(4096)
_FW_SAVE = const(16)            # persist progress every 16 blocks (64 KiB)


def prepare(m, save):
    """Check the image fits the next OTA partition; returns a FwSink writing into it."""
    import esp32
    run = esp32.Partition(esp32.Partition.RUNNING)
    part = run.get_next_update()
    cap = part.ioctl(4, 0) * part.ioctl(5, 0)
    if m["size"] > cap:
        raise OTAError("oversized firmware: %d bytes, partition %s holds %d"
                       % (m["size"], part.info()[4], cap))
    if esp32.Partition(esp32.Partition.BOOT).info()[4] != run.info()[4]:
        run.set_boot()                  # never leave the boot pointer on a half-written image
    s = ota_boot.load()
    if (s.get("fw") or {}).get("label") == part.info()[4]:
        s["fw"] = None
        ota_boot.save(s)
    return FwSink(part, m, save)


def reopen(m, save, done):
    """The sink of a transfer interrupted by a reboot, and the data offset to resume at."""
    import esp32
    sink = FwSink(esp32.Partition(esp32.Partition.RUNNING).get_next_update(), m, save)
    return sink, sink.resume(done)


class FwSink:
    """A firmware image -> the next OTA partition in 4 KiB blocks; set_boot once verified."""

    def __init__(self, part, m, save):
        self.part, self._save = part, save
        self.version, self.deadline = m["version"], m.get("deadline")
        self._want, self._size = m["files"][0][2], m["size"]
        self.slot = part.info()[4]
        self._buf = bytearray(_BLK)
        self._blk = self._fill = 0
        self._h = hashlib.sha256()

    def resume(self, done):
        """Re-hash the blocks written before a reboot; returns the data offset to continue at."""
        self._blk = done // _BLK
        for i in range(self._blk):
            self.part.readblocks(i, self._buf)
            self._h.update(self._buf)
        return self._blk * _BLK

    def start(self):
        pass

    def close(self):
        pass

    def write(self, mv):
        buf = self._buf
        while len(mv):
            k = min(len(mv), _BLK - self._fill)
            buf[self._fill:self._fill + k] = mv[:k]
            self._h.update(mv[:k])
            self._fill += k
            mv = mv[k:]
            if self._fill == _BLK:
                self.part.writeblocks(self._blk, buf)
                self._blk += 1
                self._fill = 0
                if self._blk % _FW_SAVE == 0:
                    self._save(self._blk * _BLK)

    def finish(self, hdr, so, sl, hl):
        buf = self._buf
        if self._fill:
            for i in range(self._fill, _BLK):
                buf[i] = 0xFF
            self.part.writeblocks(self._blk, buf)
            self._fill = 0
        want = self._want
        if hexs(self._h.digest()) != want:
            raise OTAError("hash mismatch for the firmware image: bundle corrupted")
        n = self._size
        h = hashlib.sha256()
        i = 0
        while n > 0:                                # read the partition back
            self.part.readblocks(i, buf)
            h.update(buf if n >= _BLK else memoryview(buf)[:n])
            n -= _BLK
            i += 1
            yield                                   # the event loop runs between blocks
        if hexs(h.digest()) != want:
            raise OTAError("firmware read-back mismatch: flash write failed")
        s = ota_boot.load()
        s["fw"] = {"ver": self.version, "label": self.slot, "st": "staged"}
        s["fail"] = None
        s["dl"] = self.deadline
        ota_boot.save(s)            # before set_boot: a power cut in between only loses the switch
        try:
            self.part.set_boot()
        except OSError as e:
            s["fw"] = None
            ota_boot.save(s)
            raise OTAError("firmware image rejected by set_boot (%s): not a valid image" % e)
        return "firmware %s written to %s: reboot to switch" % (self.version, self.slot)
