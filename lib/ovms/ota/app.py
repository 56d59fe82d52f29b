"""ota.app: stages an app bundle's files in the free slot /app/<a|b>/, verifies and marks it staged."""
import os
import hashlib
from micropython import const
import ota_boot
from ovms import ota
from ovms.ota.fs import OTAError, fp, hexs, mkdirs, rmtree, du, rm, free, hash_file, check_path, \
    copy_range, hash_steps
from ovms.ota.fs import size as fsize

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
    """Files of an app bundle -> /app/<slot>/<path>.part, renamed once its SHA-256 matches.

    The file table is kept on flash (/ota/stage.idx, one "size sha256 path" line per file), not
    in RAM, so a transfer holds only the current entry."""

    def __init__(self, slot, m, buf):
        self.slot, self._buf = slot, buf
        self.version, self.deadline = m["version"], m.get("deadline")
        self._base = fp("/app/" + slot + "/")
        self._idx = fp("/ota/stage.idx")
        with open(self._idx, "w") as f:
            for p, n, d in m["files"]:
                f.write("%d %s %s\n" % (n, d, p))
        self._ix = self._ent = self._f = self._h = None
        self._fo = 0
        self._rewind()

    def _rewind(self):
        if self._ix:
            self._ix.close()
        self._ix = open(self._idx)
        self._next()

    def _next(self):
        ln = self._ix.readline().split()
        self._ent = (ln[2], int(ln[0]), ln[1]) if ln else None
        self._fo = 0
        self._h = None

    def resume(self):
        """Bytes of data already on flash (complete files + the partial one)."""
        done = 0
        while self._ent:
            p, n, d = self._ent
            if fsize(self._base + p) != n:
                k = fsize(self._base + p + ".part")
                if 0 < k <= n:
                    done += k
                    if k < n:
                        self._fo = k
                        break
                    # cut between its last byte and the rename: finish it now (it may be
                    # the last file, with no more data to come)
                    h = hashlib.sha256()
                    hash_file(self._base + p + ".part", n, h, self._buf)
                    self._finish(h.digest())
                    continue
                rm(self._base + p + ".part")
                break
            done += n
            self._next()
        return done

    def start(self):
        self._skip_empty()

    def close(self):
        for f in (self._f, self._ix):
            if f:
                f.close()
        self._f = self._ix = None

    def _skip_empty(self):
        while self._ent and self._ent[1] == 0:
            self._finish(hashlib.sha256().digest())

    def _finish(self, dig):
        p, n, d = self._ent
        t = self._base + p
        if n == 0:
            mkdirs(t[:t.rfind("/")])
            open(t + ".part", "wb").close()
        if hexs(dig) != d:
            raise OTAError("hash mismatch for %s: bundle corrupted" % p)
        rm(t)
        os.rename(t + ".part", t)
        self._next()

    def write(self, mv):
        while len(mv):
            if not self._ent:
                raise OTAError("oversized bundle: data past the last file")
            p, n, d = self._ent
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
                f, self._f = self._f, None
                f.close()
                self._finish(self._h.digest())
                self._skip_empty()
        if self._f:
            self._f.flush()

    def finish(self, hdr, so, sl, hl):
        """All data in: read every file back, store the signed manifest (copied from the staged
        header hdr: signature at so, sl bytes, manifest up to hl), mark the slot staged.
        A generator of steps (see ota_rx.Receiver.steps); returns the message."""
        self._rewind()
        while self._ent:
            p, n, d = self._ent
            h = hashlib.sha256()
            if fsize(self._base + p) != n:
                raise OTAError("staged file %s is missing" % p)
            yield from hash_steps(self._base + p, n, h, self._buf)
            if hexs(h.digest()) != d:
                raise OTAError("hash mismatch for %s on flash" % p)
            self._next()
        self.close()
        copy_range(hdr, so, sl, self._base + "manifest.sig", self._buf)
        copy_range(hdr, so + sl, hl - so - sl, self._base + "manifest.tmp", self._buf)
        os.rename(self._base + "manifest.tmp", self._base + "manifest.json")
        s = ota_boot.load()
        s["stg"] = self.slot
        s["tries"] = 0
        s["fail"] = None
        s["dl"] = self.deadline
        ota_boot.save(s)
        return "version %s staged in slot %s: reboot to switch" % (self.version, self.slot)
