"""ota.rsa: RSA public-key parsing and PKCS#1 v1.5 SHA-256 signature check with pow()."""
import sys
import binascii
import ota_boot
from ovms.ota.fs import OTAError, mkdirs

KEY = "/store/ota.pub"          # RSA public key (PEM) unless config `ota pubkey` says
# ASN.1 DigestInfo prefix for SHA-256 (RFC 8017 9.2 note 1)
_DI = b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"
_RSA_OID = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"


def _der(b, i):
    """(tag, start, end) of the DER element at b[i]."""
    t = b[i]
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i:i + k], "big")
        i += k
    if i + n > len(b):
        raise ValueError("truncated DER")
    return t, i, i + n


def parse_key(pem):
    """(n, e, k) from an RSA public key PEM (SubjectPublicKeyInfo or PKCS#1); k = modulus bytes."""
    if isinstance(pem, (bytes, bytearray)):
        pem = pem.decode()
    try:
        der = binascii.a2b_base64("".join(
            ln.strip() for ln in pem.split("\n") if ln.strip() and not ln.startswith("-----")))
        t, s, e = _der(der, 0)
        t2, s2, e2 = _der(der, s)
        if t2 == 0x30:                          # SubjectPublicKeyInfo
            t3, s3, e3 = _der(der, s2)
            if der[s3:e3] != _RSA_OID:
                raise ValueError("not an RSA key")
            t3, s3, e3 = _der(der, e2)          # BIT STRING: unused-bits byte, RSAPublicKey
            der = der[s3 + 1:e3]
            t, s, e = _der(der, 0)
            t2, s2, e2 = _der(der, s)
        nb = der[s2:e2]
        while nb and nb[0] == 0:
            nb = nb[1:]
        t3, s3, e3 = _der(der, e2)
        if t != 0x30 or t2 != 2 or t3 != 2:
            raise ValueError("not an RSA public key")
        n = int.from_bytes(nb, "big")
        ex = int.from_bytes(der[s3:e3], "big")
    except (ValueError, IndexError) as x:
        raise OTAError("bad OTA public key: %s" % x)
    if len(nb) < 256 or ex < 3:
        raise OTAError("bad OTA public key: RSA-2048 or larger required")
    return n, ex, len(nb)


def verify(digest, sig, key):
    """True if sig is a valid RSA PKCS#1 v1.5 signature of the SHA-256 digest under key (n, e, k)."""
    n, e, k = key
    if len(sig) != k:
        return False
    s = int.from_bytes(sig, "big")
    if s >= n:
        return False
    m = pow(s, e, n).to_bytes(k, "big")
    return m == b"\x00\x01" + b"\xff" * (k - 3 - len(_DI) - 32) + b"\x00" + _DI + digest


def key_path():
    """Where the public key is: config `ota pubkey` (set at provisioning), else KEY."""
    c = sys.modules.get("ovms.config")      # only when the app loaded it: no import cost here
    if c:
        try:
            return c.get("ota", "pubkey") or KEY
        except Exception:
            pass
    return KEY


def load_key():
    p = key_path()
    try:
        with open(ota_boot.ROOT + p) as f:
            return parse_key(f.read())
    except OSError:
        raise OTAError("no OTA public key on the module (%s): provision one with "
                       "`ovms.py --port PORT provision --ota-pubkey KEY.pub`" % p)


def set_pubkey(pem):
    """Validate and store the OTA public key (at key_path())."""
    parse_key(pem)
    p = ota_boot.ROOT + key_path()
    mkdirs(p[:p.rfind("/")])
    from ovms import fsutil
    fsutil.write(p, pem)
