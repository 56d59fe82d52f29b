"""ota.rx: the OTA transfer protocol: chunks with offsets, signed header check, resume after reboot."""
import json
import hashlib
from time import ticks_ms, ticks_diff
from micropython import const
import ota_boot
from ovms import ota
from ovms.ota.fs import OTAError, fp, mkdirs, rm, check_manifest, run
from ovms.ota.fs import size as fsize

# Bundle = header + data. Header: b"MOTA", format 1, 0, u16 sig length S, u32 manifest length M
# (big-endian), S bytes RSA PKCS#1 v1.5 SHA-256 signature over the M manifest bytes, the manifest
# (JSON: format, kind "app"|"firmware", version, arch, mpy, size, files [[path, size, sha256hex]],
# deadline?, downgrade?, newkey?). Data: the files' contents concatenated in manifest order.
# Key rotation: a manifest "newkey" (PEM) replaces the module's OTA public key once the bundle
# is staged: only an update signed with the current key can change the key.
# Anti-rollback: an app bundle whose version is not newer than the highest version ever
# committed (ota_boot state "sv") is refused unless its signed manifest says "downgrade": true
# (`ota push --allow-downgrade`), so a recorded old bundle cannot be replayed.
_HDR = const(12)
_MAX_SIG = const(1024)
_MAX_MAN = const(16384)
_IDLE_MS = const(120000)    # a transfer idle this long may be taken over by another client


class Receiver:
    """MQTT-agnostic OTA receiver: handle(op, payload) -> JSON reply bytes.

    ops: status | begin {"id","size"} | data <u32 offset><bytes> | end | abort | reboot.
    Every reply carries "op" and, while a transfer runs, "next" (the offset the device wants).
    After replying to "reboot" the caller resets the device (.reboot is True).
    A transfer belongs to the client id that began it: another client may not abort it nor
    begin another over it (unless its request is signed, or the transfer idled _IDLE_MS)."""

    def __init__(self):
        self.reboot = False
        self._last = None           # reply of the last successful end (a repeated end gets it)
        self._buf = bytearray(1024)
        self._clear()
        try:
            self._resume()
        except Exception as e:
            print("ota: cannot resume the staged transfer:", e)
            self._clear()

    def _clear(self):
        s = getattr(self, "sink", None)
        if s:
            try:
                s.close()
            except OSError:
                pass
        self.sink = self.slot = self.id = self.owner = None
        self.size = self.next = self.hl = 0
        self.seen = ticks_ms()

    def _foreign(self, cid, signed):
        return (self.id and not signed and cid != self.owner and self.owner is not None
                and ticks_diff(ticks_ms(), self.seen) < _IDLE_MS)

    def handle(self, op, payload=b"", cid=None, signed=False):
        """Process one request of client id cid (signed: it carried a valid signature);
        never raises."""
        return run(self.steps(op, payload, cid, signed))

    def steps(self, op, payload=b"", cid=None, signed=False):
        """handle() as a generator: the read-back of "end" (up to 2 MB) yields after each
        buffer, so the caller can run the event loop in between; returns the reply."""
        try:
            if op in ("begin", "abort") and self._foreign(cid, signed):
                r = {"error": "a transfer by another client is in progress: only that client "
                              "(or a signed request) may abort or replace it"}
            elif op == "status":
                r = ota.status(self)
            elif op == "begin":
                r = self._begin(payload, cid)
            elif op == "data":
                if cid == self.owner:
                    self.seen = ticks_ms()
                r = self._data(payload)
            elif op == "end":
                r = yield from self._end()
            elif op == "abort":
                self._abort()
                r = {"ok": True}
            elif op == "reboot":
                self.reboot = True
                r = {"ok": True}
            else:
                r = {"error": "unknown OTA operation %r" % (op,)}
        except OTAError as e:
            self._abort()
            r = {"error": str(e)}
        except Exception as e:      # never let a bad bundle crash the device
            self._abort()
            r = {"error": "OTA %s failed: %s %s" % (op, type(e).__name__, e)}
        r["op"] = op
        if self.id and "next" not in r and "error" not in r:
            r["next"] = self.next
        return json.dumps(r).encode()

    # /ota/stage.json {"id","size","slot","fw"} + /ota/stage.hdr (the header bytes received so far)
    def _meta(self, fw=0):
        mkdirs(fp("/ota"))
        from ovms import fsutil
        fsutil.write(fp("/ota/stage.json"),
                     json.dumps({"id": self.id, "size": self.size, "slot": self.slot, "fw": fw,
                                 "cid": self.owner}))

    def _abort(self):
        self._last = None
        self._clear()
        rm(fp("/ota/stage.json"))
        rm(fp("/ota/stage.hdr"))
        rm(fp("/ota/stage.idx"))

    def _begin(self, payload, cid=None):
        try:
            req = json.loads(payload)
            bid = str(req["id"])
            n = int(req["size"])
        except (ValueError, KeyError, TypeError):
            return {"error": "begin needs a JSON payload {\"id\": ..., \"size\": ...}"}
        if ota_boot.trial:
            return {"error": "version %s is on trial: retry after it is committed or rolled back"
                    % ota.version(ota_boot.booted)}
        if n <= _HDR:
            return {"error": "bundle too small (%d bytes)" % n}
        self._abort()
        self.id = bid
        self.owner = cid
        self.size = n
        mkdirs(fp("/ota"))
        open(fp("/ota/stage.hdr"), "wb").close()
        self._meta()
        return {"ok": True, "next": 0}

    def _data(self, payload):
        if not self.id:
            return {"error": "no transfer in progress: send begin first"}
        if len(payload) < 4:
            return {"error": "data chunk without offset", "next": self.next}
        off = int.from_bytes(payload[:4], "big")
        mv = memoryview(payload)[4:]
        if off != self.next:                # duplicate or out of order: tell the host where we are
            return {"next": self.next}
        if off + len(mv) > self.size:
            raise OTAError("oversized bundle: more data than the declared %d bytes" % self.size)
        while len(mv):
            if not self.sink:               # header: 12 fixed bytes, then signature + manifest
                k = min(len(mv), (self.hl or _HDR) - self.next)
                with open(fp("/ota/stage.hdr"), "ab") as f:
                    f.write(mv[:k])
                self.next += k
                mv = mv[k:]
                if self.next == _HDR:
                    self._parse_hl()
                if self.next == self.hl:
                    self._accept()
            else:
                self.sink.write(mv)
                self.next += len(mv)
                break
        return {"next": self.next}

    def _parse_hl(self):
        with open(fp("/ota/stage.hdr"), "rb") as f:
            h = f.read(_HDR)
        if h[:4] != b"MOTA" or h[4] != 1:
            raise OTAError("not an OTA bundle (bad magic or format)")
        sl = int.from_bytes(h[6:8], "big")
        ml = int.from_bytes(h[8:12], "big")
        if not 0 < sl <= _MAX_SIG or not 0 < ml <= _MAX_MAN:
            raise OTAError("invalid bundle header (signature %d, manifest %d bytes)" % (sl, ml))
        self.hl = _HDR + sl + ml
        if self.hl > self.size:
            raise OTAError("bundle truncated: its header needs %d bytes, bundle has %d"
                           % (self.hl, self.size))

    def _open_manifest(self, f):
        """Position f (the staged header) at the manifest; returns the signature length."""
        f.seek(6)
        sl = int.from_bytes(f.read(2), "big")
        f.seek(_HDR + sl)
        return sl

    def _accept(self):
        """Header complete: check the signature and manifest, then prepare the target."""
        mv = memoryview(self._buf)
        h = hashlib.sha256()
        with open(fp("/ota/stage.hdr"), "rb") as f:
            sl = self._open_manifest(f)
            n = self.hl - _HDR - sl
            while n > 0:
                k = f.readinto(mv[:min(n, len(mv))])
                if not k:
                    raise OTAError("staged header is damaged")
                h.update(mv[:k])
                n -= k
            f.seek(_HDR)
            from ovms.ota.rsa import load_key, verify
            if not verify(h.digest(), f.read(sl), load_key()):
                raise OTAError("signature verification failed: bundle not signed with this "
                               "module's OTA key, or tampered with")
            self._open_manifest(f)
            m = check_manifest(f, self.hl, self.size)
        sv = ota_boot.load().get("sv")
        if (m["kind"] == "app" and sv is not None and m.get("downgrade") is not True
                and ota_boot.vkey(m["version"]) <= ota_boot.vkey(sv)):
            raise OTAError("version %s is not newer than %s, the highest committed "
                           "(anti-rollback): push it with --allow-downgrade to go back"
                           % (m["version"], sv))
        if m.get("newkey"):
            from ovms.ota.rsa import parse_key
            parse_key(m["newkey"])      # a bad new key: refused before anything is written
        if m["kind"] == "firmware":
            from ovms.ota import fw as ota_fw
            self.sink = ota_fw.prepare(m, self._meta)
        else:
            from ovms.ota import app as ota_app
            self.sink = ota_app.prepare(m, self._buf)
        self.slot = self.sink.slot
        self._meta()
        self.sink.start()

    def _resume(self):
        """After a reboot: rebuild the transfer position from what is on flash."""
        try:
            with open(fp("/ota/stage.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            return
        self.id, self.size, slot = st["id"], st["size"], st["slot"]
        self.owner = st.get("cid")
        s = ota_boot.load()
        if slot and (slot in (s.get("stg"), s.get("run"), ota_boot.booted)
                     or slot == (s.get("fw") or {}).get("label")):
            self._abort()                   # finished already; only the clean-up was cut off
            return
        hs = fsize(fp("/ota/stage.hdr"))
        if hs < 0:
            raise OTAError("header missing")
        self.next = hs
        if hs >= _HDR:
            self._parse_hl()
        if not slot:                        # header not accepted yet
            if self.hl and hs > self.hl:
                raise OTAError("header too long")
            if self.hl and hs == self.hl:
                self._accept()
            return
        if fsize(fp("/ota/stage.hdr")) != self.hl:
            raise OTAError("staged header is damaged")
        with open(fp("/ota/stage.hdr"), "rb") as f:
            self._open_manifest(f)
            m = check_manifest(f, self.hl, self.size)
        self.slot = slot
        if m["kind"] == "firmware":
            from ovms.ota import fw as ota_fw
            self.sink, done = ota_fw.reopen(m, self._meta, st.get("fw", 0))
        else:
            from ovms.ota.app import AppSink
            self.sink = AppSink(slot, m, self._buf)
            done = self.sink.resume()
        self.next = self.hl + done

    def _end(self):
        if not self.id:
            return self._last or {"error": "no transfer in progress: send begin first"}
        if self.next != self.size or not self.sink:
            return {"error": "bundle truncated: received %d of %d bytes" % (self.next, self.size)}
        with open(fp("/ota/stage.hdr"), "rb") as f:
            sl = self._open_manifest(f)
            nk = check_manifest(f, self.hl, self.size).get("newkey")
        msg = yield from self.sink.finish(fp("/ota/stage.hdr"), _HDR, sl, self.hl)
        if nk:
            from ovms.ota.rsa import set_pubkey
            set_pubkey(nk)          # (validated when the header was accepted)
            msg = (msg or "staged") + "; OTA key replaced"
        r = {"ok": True, "staged": self.sink.version, "slot": self.slot, "next": self.size,
             "msg": msg}
        self._abort()
        self._last = r
        _unload()
        return r


def _unload():
    """Drop the staging modules after a transfer (their code is RAM unless frozen)."""
    import ovms
    for n in ("ota.rsa", "ota.app", "ota.fw"):
        ovms.unload(n)
