"""cli_ota: `ota keygen|push|status` on the host: build and sign bundles, push them over MQTT."""
import hashlib
import json
import os
import queue
import re
import struct
import sys
import tempfile
import time

import deploy

MAGIC = b"MOTA"
FORMAT = 1
CHUNK = int(os.environ.get("OVMS_OTA_CHUNK", "1024"))   # bytes of data per MQTT message
WINDOW = int(os.environ.get("OVMS_OTA_WINDOW", "4"))    # chunks in flight before waiting for acks


class PushError(Exception):
    pass


# -- keys and bundles ------------------------------------------------------------------------------

def keygen(args):
    """Write an RSA-3072 private key (PEM, mode 0600) to args.key_file and the public key to .pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    path = args.key_file
    for p in (path, path + ".pub"):
        if os.path.exists(p):
            print("error: %s exists; refusing to overwrite a signing key" % p, file=sys.stderr)
            return 1
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(path + ".pub", "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    print("private key: %s (keep it secret, off the module)\npublic key:  %s.pub "
          "(provision with --ota-pubkey)" % (path, path))
    return 0


def load_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as e:
        raise PushError("cannot load signing key %s: %s" % (path, e))
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PushError("%s is not an RSA private key" % path)
    return key


def sign(key, data):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def make_bundle(kind, version, files, key, arch=None, mpy=None, deadline=None, downgrade=False,
                newkey=None):
    """Bundle bytes: header (magic, signature, signed JSON manifest) + file contents in order."""
    man = {"format": FORMAT, "kind": kind, "version": version, "arch": arch, "mpy": mpy,
           "size": sum(len(b) for _, b in files),
           "files": [[p, len(b), hashlib.sha256(b).hexdigest()] for p, b in files]}
    if deadline:
        man["deadline"] = int(deadline)
    if downgrade:       # signed: the module accepts a version not newer than its highest
        man["downgrade"] = True
    if newkey:          # key rotation: the module's OTA public key becomes this PEM
        man["newkey"] = newkey
    mb = json.dumps(man, separators=(",", ":"), sort_keys=True).encode()
    sig = sign(key, mb)
    head = MAGIC + bytes([FORMAT, 0]) + struct.pack(">HI", len(sig), len(mb))
    return head + sig + mb + b"".join(b for _, b in files)


def parse_bundle(bundle):
    """(signature, manifest bytes, manifest dict, data offset) of a bundle."""
    sl, ml = struct.unpack(">HI", bundle[6:12])
    mb = bundle[12 + sl:12 + sl + ml]
    return bundle[12:12 + sl], mb, json.loads(mb), 12 + sl + ml


def source_version(source):
    try:
        with open(os.path.join(source, "lib", "ovms", "__init__.py")) as f:
            m = re.search(r"^VERSION\s*=\s*[\"']([^\"']+)", f.read(), re.M)
        return m.group(1) if m else "0.0.0"
    except OSError:
        return "0.0.0"


def app_files(source, arch="xtensawin"):
    """[(path on the device slot, bytes)] for every lib/ file, .py compiled to .mpy."""
    if not os.path.isdir(os.path.join(source, "lib")):
        raise PushError("%s has no lib/ directory" % source)
    with tempfile.TemporaryDirectory() as tmp:
        lib = deploy.gather(source, os.path.join(tmp, "src"))
        out = deploy.compile_lib(lib, os.path.join(tmp, "out"), arch,
                                 exclude=(deploy.BOOT_HELPER,))
        out.append(deploy.write_qstrs(os.path.join(tmp, "out"), out))
        files = []
        for rel, p in out:
            with open(p, "rb") as f:
                files.append(("lib/" + rel, f.read()))
    if not files:
        raise PushError("%s/lib is empty" % source)
    return files


def app_bundle(source, key, version=None, arch="xtensawin", mpy=6, deadline=None,
               downgrade=False, newkey=None):
    return make_bundle("app", version or source_version(source), app_files(source, arch), key,
                       arch=arch, mpy=mpy, deadline=deadline, downgrade=downgrade, newkey=newkey)


def firmware_bundle(image, key, version=None, deadline=None):
    try:
        with open(image, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PushError("cannot read firmware image: %s" % e)
    if not data or data[0] != 0xE9:
        raise PushError("%s is not an ESP32 app image (no 0xE9 magic byte): push the app "
                        "image (build/firmware/micropython.bin), not the merged flash image"
                        % image)
    return make_bundle("firmware", version or os.path.basename(image), [("firmware.bin", data)],
                       key, deadline=deadline)


def bundle_id(bundle):
    return hashlib.sha256(bundle).hexdigest()[:16]


# -- MQTT link ---------------------------------------------------------------------------------------

class Link:
    """Request/reply over <prefix>client/<cid>/ota/<op> -> <prefix>client/<cid>/ota-reply (QoS 1),
    on the CLI's one MQTT link (cli_link: prefix, TLS, auth)."""

    def __init__(self, args):
        import cli_link
        self.q = queue.Queue()
        try:
            self.link = cli_link.open_link(args, "ota-", {"ota-reply": self._on_reply})
        except cli_link.CliError as e:
            raise PushError(str(e))
        self.cid = self.link.cid

    def _on_reply(self, payload, topic):
        try:
            r = json.loads(payload)
            if isinstance(r, dict):
                self.q.put(r)
        except ValueError:
            pass

    def send(self, op, payload=b""):
        if op in ("begin", "abort", "reboot"):
            # a module with server.v3 commands signed wants these signed (as shell commands)
            payload = self.link.signed("ota/" + op, payload)
        self.link.publish("ota/" + op, payload, qos=1)

    def wait(self, op, timeout):
        end = time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                return None
            try:
                r = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if r.get("op") == op:
                return r

    def request(self, op, payload=b"{}", timeout=10.0):
        # never empty: an empty MQTT payload means "delete the retained message" to OVMS
        while not self.q.empty():
            self.q.get_nowait()
        self.send(op, payload)
        return self.wait(op, timeout)

    def close(self):
        self.link.close()


class Progress:
    """A progress bar on stderr."""

    def __init__(self, total, label):
        self.total, self.label, self.t0, self.last = total, label, time.time(), 0.0

    def update(self, n, force=False):
        now = time.time()
        if not force and now - self.last < 0.1 and n < self.total:
            return
        self.last = now
        frac = n / self.total if self.total else 1.0
        bar = "#" * int(frac * 30)
        rate = n / max(now - self.t0, 1e-3) / 1024
        sys.stderr.write("\r%s [%-30s] %3d%% %.1f/%.1f KB %.1f KB/s " % (
            self.label, bar, frac * 100, n / 1024, self.total / 1024, rate))
        sys.stderr.flush()

    def done(self):
        sys.stderr.write("\n")


def _status(link, timeout, tries=3):
    for _ in range(tries):
        r = link.request("status", b"{}", timeout)
        if r is not None:
            return r
    raise PushError("no reply from the module on %s (is it online, and are --user/--id/--prefix "
                    "right?)" % link.link.prefix)


def transfer(link, bundle, timeout=10.0, progress=None, stall=None):
    """Send bundle (resuming a matching partial transfer); returns the device's `end` reply."""
    bid = bundle_id(bundle)
    size = len(bundle)
    stall = stall or max(60.0, 6 * timeout)
    st = _status(link, timeout)
    rx = st.get("rx") or {}
    if rx.get("id") == bid and rx.get("size") == size:
        acked = rx["next"]
        if acked:
            print("resuming at %d of %d bytes" % (acked, size), file=sys.stderr)
    else:
        r = link.request("begin", json.dumps({"id": bid, "size": size}).encode(), timeout)
        if r is None:
            raise PushError("no reply to begin")
        if "error" in r:
            raise PushError(r["error"])
        acked = r["next"]
    sent, inflight, last = acked, 0, time.time()
    while acked < size:
        while sent < size and sent - acked < WINDOW * CHUNK:
            link.send("data", struct.pack(">I", sent) + bundle[sent:sent + CHUNK])
            sent = min(size, sent + CHUNK)
            inflight += 1
        r = link.wait("data", timeout)
        if r is None:                       # lost messages or the device restarted: ask where it is
            if time.time() - last > stall:
                raise PushError("transfer stalled at %d of %d bytes" % (acked, size))
            try:
                st = _status(link, timeout, 1)
            except PushError:
                continue
            rx = st.get("rx") or {}
            if rx.get("id") != bid:
                raise PushError("the module dropped the transfer; run the push again")
            print("\nno reply: resuming at %d of %d bytes" % (rx["next"], size), file=sys.stderr)
            acked = sent = rx["next"]
            inflight = 0
            continue
        if "error" in r:
            if progress:
                progress.done()             # the error on its own line, not after the bar
            raise PushError(r["error"])
        inflight -= 1
        if r.get("next", -1) > acked:
            acked = r["next"]
            last = time.time()
            if progress:
                progress.update(acked)
        if inflight <= 0 and acked < sent:  # every chunk answered, some not taken: resend from acked
            sent, inflight = acked, 0
    if progress:
        progress.update(size, True)
        progress.done()
    for _ in range(3):
        r = link.request("end", b"{}", max(timeout, 30.0))
        if r is not None:
            break
    else:
        raise PushError("no reply to end")
    if "error" in r:
        raise PushError(r["error"])
    return r


def wait_switch(link, man, slot, timeout, limit):
    """After a reboot: wait until the new version is committed, or report the rollback."""
    end = time.time() + limit
    fw = man["kind"] == "firmware"
    seen_reboot = False
    while time.time() < end:
        time.sleep(1.0)
        r = link.request("status", b"{}", min(timeout, 5.0))
        if r is None:
            seen_reboot = True
            continue
        if fw:
            f = r.get("fw") or {}
            if r.get("firmware") == slot and f.get("st") == "ok" and f.get("ver") == man["version"]:
                return r
            if not f and r.get("fail"):
                raise PushError("update rolled back: %s" % r["fail"])
        else:
            if r.get("running") == man["version"] and r.get("slot") == slot and not r["trial"]:
                return r
            if not r.get("staged") and r.get("running") != man["version"] and r.get("fail"):
                raise PushError("update rolled back: %s" % r["fail"])
        if r.get("trial"):
            seen_reboot = True
    raise PushError("module did not confirm version %s within %d s%s" % (
        man["version"], limit, "" if seen_reboot else " (it did not seem to reboot)"))


def print_status(r, out=None):
    out = out or sys.stdout
    slot = r.get("slot")
    print("Running:  %s (%s)%s" % (r.get("running"), "factory" if slot == "f" else "slot %s" % slot,
                                   " on trial" if r.get("trial") else ""), file=out)
    print("Staged:   %s" % (r.get("staged") or "-"), file=out)
    print("Previous: %s" % (r.get("previous") or "-"), file=out)
    if r.get("firmware"):
        fw = r.get("fw") or {}
        print("Firmware: %s%s" % (r["firmware"], " (update %s %s)" % (fw.get("ver"), fw.get("st"))
                                  if fw else ""), file=out)
    if r.get("rx"):
        print("Transfer: %d/%d bytes" % (r["rx"]["next"], r["rx"]["size"]), file=out)
    if r.get("fail"):
        print("Last failure: %s" % r["fail"], file=out)
    print("Code:     %s (mpy %s), %d KB free" % (r.get("arch") or "bytecode", r.get("mpy"),
                                                 (r.get("free") or 0) // 1024), file=out)


def main(args):
    """`ota push` / `ota status` over MQTT (args from tools/ovms.py)."""
    try:
        link = Link(args)
    except PushError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    try:
        if args.ota_cmd == "status":
            r = _status(link, args.timeout)
            if getattr(args, "json", False):
                print(json.dumps(r, indent=1, sort_keys=True))
            else:
                print_status(r)
            return 0
        return _push(link, args)
    except PushError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    finally:
        link.close()


def _push(link, args):
    key = load_key(args.key_file)
    deadline = os.environ.get("OVMS_OTA_DEADLINE")
    st = _status(link, args.timeout)
    if getattr(args, "firmware", None):
        bundle = firmware_bundle(args.firmware, key, args.version, deadline)
    else:
        source = os.path.abspath(args.source or deploy.REPO)
        arch = st.get("arch") or "xtensawin"
        if st.get("mpy") not in (None, 6):
            raise PushError("the module runs .mpy version %s; this mpy-cross emits 6" % st["mpy"])
        nk = getattr(args, "new_pubkey", None)
        if nk:
            with open(nk) as f:
                nk = f.read()
        bundle = app_bundle(source, key, args.version, arch, st.get("mpy") or 6, deadline,
                            getattr(args, "allow_downgrade", False), nk)
    sig, mb, man, hl = parse_bundle(bundle)
    print("bundle: %s %s, %d files, %d bytes" % (man["kind"], man["version"], len(man["files"]),
                                                 len(bundle)), file=sys.stderr)
    r = transfer(link, bundle, args.timeout, Progress(len(bundle), "push %s" % man["version"]))
    print(r.get("msg") or "staged")
    if link.request("reboot", b"{}", args.timeout) is None:
        raise PushError("no reply to reboot")
    print("rebooting; waiting for the module to report healthy...", file=sys.stderr)
    limit = int(man.get("deadline") or 180) + 60
    r = wait_switch(link, man, r["slot"], args.timeout, limit)
    print("version %s committed (%s)" % (man["version"], r.get("firmware") if man["kind"] ==
                                         "firmware" else "slot %s" % r.get("slot")))
    return 0
