"""ota.rsa: RSA public-key parsing and PKCS#1 v1.5 SHA-256 signature check with pow()."""
import binascii
import ota_boot
from ovms.ota.fs import OTAError, mkdirs

# The OTA public key lives at one fixed place, outside every area an OTA transfer writes
# (/ota staging, /app slots): no config entry can point it elsewhere. It changes only by
# provisioning over the serial console or by a bundle signed with the current key that carries
# a new key (key rotation, see ovms.ota.app).
KEY = "/store/ota.pub"
# ASN.1 DigestInfo prefix for SHA-256 (RFC 8017 9.2 note 1)
_DI = b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"
# AlgorithmIdentifier rsaEncryption with NULL parameters, exactly as DER encodes it
_RSA_ALG = b"\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01\x05\x00"
_PEM = ((b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"),
        (b"-----BEGIN RSA PUBLIC KEY-----", b"-----END RSA PUBLIC KEY-----"))


def _der(b, i, tag, end):
    """(start, end) of the DER element at b[i], which must have `tag`, minimal length
    encoding and lie within b[:end]."""
    if i + 2 > end or b[i] != tag:
        raise ValueError("unexpected DER element")
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if k < 1 or k > 2 or i + k > end or b[i] == 0:
            raise ValueError("bad DER length")
        n = int.from_bytes(b[i:i + k], "big")
        i += k
        if n < 0x80:
            raise ValueError("bad DER length")
    if i + n > end:
        raise ValueError("truncated DER")
    return i, i + n


def _int(b, i, end):
    """(value bytes without the sign byte, end) of a positive minimal DER INTEGER at b[i]."""
    s, e = _der(b, i, 2, end)
    if s == e or b[s] & 0x80 or (b[s] == 0 and e - s > 1 and not b[s + 1] & 0x80):
        raise ValueError("bad DER integer")
    return (b[s + 1:e] if b[s] == 0 else b[s:e]), e


def parse_key(pem):
    """(n, e, k) from an RSA public key PEM (SubjectPublicKeyInfo or PKCS#1); k = modulus bytes.
    Strict: PEM armour around canonical base64 only, exact DER, nothing before or after."""
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        ls = [ln.strip() for ln in bytes(pem).strip().split(b"\n")]
        if len(ls) < 3 or (ls[0], ls[-1]) not in _PEM:
            raise ValueError("PEM armour required")
        body = b"".join(ls[1:-1])
        der = binascii.a2b_base64(body)
        if binascii.b2a_base64(der).strip().replace(b"\n", b"") != body:
            raise ValueError("not canonical base64")
        s, e = _der(der, 0, 0x30, len(der))
        if e != len(der):
            raise ValueError("data after the key")
        if ls[0] == _PEM[0][0]:                 # SubjectPublicKeyInfo
            k = s + len(_RSA_ALG)
            if der[s:k] != _RSA_ALG:
                raise ValueError("not an RSA key")
            s, e2 = _der(der, k, 3, e)          # BIT STRING: unused-bits byte 0, RSAPublicKey
            if e2 != e or s == e or der[s]:
                raise ValueError("bad key BIT STRING")
            s, e = _der(der, s + 1, 0x30, e)
            if e != len(der):
                raise ValueError("data after the key")
        nb, i = _int(der, s, e)
        eb, i = _int(der, i, e)
        if i != e:
            raise ValueError("data after the key")
        n = int.from_bytes(nb, "big")
        ex = int.from_bytes(eb, "big")
    except (ValueError, IndexError, TypeError) as x:
        raise OTAError("bad OTA public key: %s" % x)
    if len(nb) < 256 or ex < 3 or not ex & 1:
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
    """Where the public key is (fixed: KEY)."""
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
