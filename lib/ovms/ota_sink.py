"""ota_sink: writes bundle data into an app slot (files) or a firmware partition, verifies, switches."""
import os
import hashlib
from micropython import const
import ota_boot
from ovms.ota_fs import OTAError, fp, hexs, mkdirs, rm, hash_file
from ovms.ota_fs import size as fsize

_BLK = const(4096)
_FW_SAVE = const(16)            # firmware: persist progress every 16 blocks (64 KiB)


class AppSink:
    """Files of an app bundle -> /app/<slot>/<path>.part, renamed once its SHA-256 matches."""

    def __init__(self, slot, man, buf):
        self.slot, self.man, self._buf = slot, man, buf
        self._base = fp("/app/" + slot + "/")
        self._fi = self._fo = 0
        self._f = self._h = None

    def resume(self):
        """Bytes of data already on flash (complete files + the partial one)."""
        done = 0
        files = self.man["files"]
        for i, (p, n, d) in enumerate(files):
            if fsize(self._base + p) == n:
                done += n
                continue
            self._fi = i
            k = fsize(self._base + p + ".part")
            if 0 < k <= n:
                self._fo = k
                done += k
            else:
                rm(self._base + p + ".part")
            return done
        self._fi = len(files)
        return done

    def start(self):
        self._skip_empty()

    def close(self):
        f, self._f = self._f, None
        if f:
            f.close()

    def _skip_empty(self):
        files = self.man["files"]
        while self._fi < len(files) and files[self._fi][1] == 0:
            self._finish(hashlib.sha256().digest())

    def _finish(self, dig):
        p, n, d = self.man["files"][self._fi]
        t = self._base + p
        if n == 0:
            mkdirs(t[:t.rfind("/")])
            open(t + ".part", "wb").close()
        if hexs(dig) != d:
            raise OTAError("hash mismatch for %s: bundle corrupted" % p)
        rm(t)
        os.rename(t + ".part", t)
        self._fi += 1
        self._fo = 0
        self._h = None

    def write(self, mv):
        files = self.man["files"]
        while len(mv):
            p, n, d = files[self._fi]
            part = self._base + p + ".part"
            if self._f is None:
                if self._fo == 0:
                    mkdirs(part[:part.rfind("/")])
                    self._h = hashlib.sha256()
                    self._f = open(part, "wb")
                else:
                    if self._h is None:             # resumed after a reboot: rebuild the hash
                        self._h = hashlib.sha256()
                        hash_file(part, self._fo, self._h, self._buf)
                    self._f = open(part, "ab")
            k = min(len(mv), n - self._fo)
            self._f.write(mv[:k])
            self._h.update(mv[:k])
            self._fo += k
            mv = mv[k:]
            if self._fo == n:
                self.close()
                self._finish(self._h.digest())
                self._skip_empty()
        if self._f:
            self._f.flush()

    def finish(self, sig, mb):
        """All data in: read every file back, write the signed manifest, mark the slot staged."""
        for p, n, d in self.man["files"]:
            h = hashlib.sha256()
            if fsize(self._base + p) != n:
                raise OTAError("staged file %s is missing" % p)
            hash_file(self._base + p, n, h, self._buf)
            if hexs(h.digest()) != d:
                raise OTAError("hash mismatch for %s on flash" % p)
        with open(self._base + "manifest.sig", "wb") as f:
            f.write(sig)
        with open(self._base + "manifest.tmp", "wb") as f:
            f.write(mb)
        os.rename(self._base + "manifest.tmp", self._base + "manifest.json")
        s = ota_boot.load()
        s["stg"] = self.slot
        s["tries"] = 0
        s["fail"] = None
        s["dl"] = self.man.get("deadline")
        ota_boot.save(s)
        return "version %s staged in slot %s: reboot to switch" % (self.man["version"], self.slot)


class FwSink:
    """A firmware image -> the next OTA partition in 4 KiB blocks; set_boot once verified."""

    def __init__(self, part, man, save):
        self.part, self.man, self._save = part, man, save
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

    def finish(self, sig, mb):
        buf = self._buf
        if self._fill:
            for i in range(self._fill, _BLK):
                buf[i] = 0xFF
            self.part.writeblocks(self._blk, buf)
            self._fill = 0
        want = self.man["files"][0][2]
        if hexs(self._h.digest()) != want:
            raise OTAError("hash mismatch for the firmware image: bundle corrupted")
        n = self.man["size"]
        h = hashlib.sha256()
        i = 0
        while n > 0:                                # read the partition back
            self.part.readblocks(i, buf)
            h.update(buf if n >= _BLK else memoryview(buf)[:n])
            n -= _BLK
            i += 1
        if hexs(h.digest()) != want:
            raise OTAError("firmware read-back mismatch: flash write failed")
        s = ota_boot.load()
        s["fw"] = {"ver": self.man["version"], "label": self.slot, "st": "staged"}
        s["fail"] = None
        s["dl"] = self.man.get("deadline")
        ota_boot.save(s)            # before set_boot: a power cut in between only loses the switch
        try:
            self.part.set_boot()
        except OSError as e:
            s["fw"] = None
            ota_boot.save(s)
            raise OTAError("firmware image rejected by set_boot (%s): not a valid image" % e)
        return "firmware %s written to %s: reboot to switch" % (self.man["version"], self.slot)
