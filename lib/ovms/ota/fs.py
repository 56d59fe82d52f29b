"""ota.fs: small flash-file helpers for OTA staging (mkdirs, rmtree, sizes, hashing, checks)."""
import os
import json
import binascii
import ota_boot


class OTAError(Exception):
    """A refused or failed update; the message is shown to the user."""


def fp(path):
    return ota_boot.ROOT + path


def hexs(b):
    return binascii.hexlify(b).decode()


def mkdirs(d):
    p = ""
    for part in d.split("/"):
        if part:
            p += "/" + part
            try:
                os.mkdir(p)
            except OSError:
                pass


def rmtree(d):
    try:
        for e in list(os.ilistdir(d)):
            p = d + "/" + e[0]
            if e[1] == 0x4000:
                rmtree(p)
            else:
                os.remove(p)
        os.rmdir(d)
    except OSError:
        pass


def du(d):
    n = 0
    try:
        for e in os.ilistdir(d):
            n += du(d + "/" + e[0]) if e[1] == 0x4000 else os.stat(d + "/" + e[0])[6]
    except OSError:
        pass
    return n


def size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return -1


def rm(p):
    try:
        os.remove(p)
    except OSError:
        pass


def hash_steps(p, n, h, buf):
    """Generator: feed the first n bytes of file p into hash h, yielding after each buffer
    (the caller lets the event loop run: a 2 MB read-back must not stall it)."""
    mv = memoryview(buf)
    with open(p, "rb") as f:
        while n > 0:
            k = f.readinto(mv[:min(n, len(buf))])
            if not k:
                raise OTAError("cannot read back " + p)
            h.update(mv[:k])
            n -= k
            yield


def hash_file(p, n, h, buf):
    """Feed the first n bytes of file p into hash h."""
    for _ in hash_steps(p, n, h, buf):
        pass


def run(g):
    """Run a generator of steps to its end; returns its return value."""
    try:
        while True:
            next(g)
    except StopIteration as e:
        return e.args[0] if e.args else None


def free():
    try:
        s = os.statvfs(ota_boot.ROOT or "/")
        return s[0] * s[3]
    except OSError:
        return 1 << 30


def check_path(p):
    if not isinstance(p, str) or not p.startswith("lib/") or ".." in p or "//" in p \
            or p.endswith("/") or "\\" in p:
        raise OTAError("invalid manifest: bad file path %r" % (p,))
    for c in p:
        if not (c.isalpha() or c.isdigit() or c in "_-./"):
            raise OTAError("invalid manifest: bad file path %r" % (p,))


def check_manifest(f, hl, size):
    """Parse the signed manifest from stream f (positioned at it) and check it against the
    header length and bundle size; returns the manifest dict."""
    try:
        m = json.load(f)
        kind = m["kind"]
        files = m["files"]
        total = 0
        for p, n, d in files:
            if not isinstance(n, int) or n < 0 or len(d) != 64:
                raise ValueError
            total += n
        str(m["version"])
    except (ValueError, KeyError, TypeError):
        raise OTAError("invalid manifest")
    if m.get("format") != 1 or kind not in ("app", "firmware") or not files:
        raise OTAError("invalid manifest: unsupported format or kind")
    if total != m.get("size"):
        raise OTAError("invalid manifest: file sizes do not add up")
    if hl + total != size:
        raise OTAError("%s: %d bytes, its manifest says %d" % (
            "bundle truncated" if size < hl + total else "oversized bundle", size, hl + total))
    if kind == "firmware" and len(files) != 1:
        raise OTAError("invalid manifest: a firmware bundle holds one image")
    return m


def copy_range(src, off, n, dst, buf):
    """Copy n bytes at offset off of file src into a new file dst, through buf."""
    mv = memoryview(buf)
    with open(src, "rb") as f, open(dst, "wb") as o:
        f.seek(off)
        while n > 0:
            k = f.readinto(mv[:min(n, len(buf))])
            if not k:
                raise OTAError("cannot read back " + src)
            o.write(mv[:k])
            n -= k
