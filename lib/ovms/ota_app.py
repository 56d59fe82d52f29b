"""ota_app: stages an app bundle's files in the free slot /app/<a|b>/, verifies and marks it staged."""
import os
import hashlib
from micropython import const
import ota_boot
from ovms import ota
from ovms.ota_fs import OTAError, fp, hexs, mkdirs, rmtree, du, rm, free, hash_file, check_path
from ovms.ota_fs import size as fsize

MAX_APP = 2 * 1024 * 1024       # largest app bundle accepted
_RESERVE = const(16384)         # flash left free after staging


def prepare(m, buf):
    """Check an app manifest against this module, free the target slot; returns an AppSink."""
    a, mpy = ota.arch()
    if m.get("mpy") is not None and (m["mpy"] != mpy or m.get("arch") not in ("", a)):
        raise OTAError("bundle compiled for %s (mpy %s), this module runs %s (mpy %s)"
                       % (m.get("arch"), m["mpy"], a, mpy))
    for f in m["files"]:
        check_path(f[0])
    if m["size"] > MAX_APP:
        raise OTAError("oversized app bundle: %d bytes, limit %d" % (m["size"], MAX_APP))
    s = ota_boot.load()
    run = ota_boot.booted or s.get("run") or "f"
    slot = "b" if run == "a" or (run == "f" and s.get("prev") == "a") else "a"
    need = m["size"] + _RESERVE + 512 * len(m["files"])
    avail = free() + du(fp("/app/" + slot))
    if need > avail:
        raise OTAError("oversized app bundle: needs %d bytes of flash, %d free" % (need, avail))
    ch = False
    for k in ("stg", "prev", "run"):       # the slot is about to be overwritten: drop references
        if s.get(k) == slot:
            s[k] = run if k == "run" else None
            ch = True
    if ch:
        ota_boot.save(s)
    rmtree(fp("/app/" + slot))
    mkdirs(fp("/app/" + slot + "/lib"))
    return AppSink(slot, m, buf)


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
