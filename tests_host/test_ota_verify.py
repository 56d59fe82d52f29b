"""OTA bundles: host build + RSA signing, device-side verification on the micropython binary, and
clear refusals of bad bundles (wrong signature/key, wrong hash, truncated, oversized, malformed)."""
import json
import os
import stat
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import cli_ota
from test_ota_helpers import (app_bundle, check_slot, device, device_arch, flash_root, keypair,
                              lines, snapshot_config, _Args)
from util import LIB, REPO, run_mpy, compiled_lib


def _push(tmp_path, root, bundle, bid=None, ch=512):
    p = os.path.join(str(tmp_path), "bundle.bin")
    with open(p, "wb") as f:
        f.write(bundle)
    rc, out = device(root, "push", p, bid or cli_ota.bundle_id(bundle), str(ch))
    return out


def _state(root):
    try:
        with open(os.path.join(root, "ota", "state.json")) as f:
            return json.load(f)
    except OSError:
        return {}


def _nothing_staged(root):
    assert not _state(root).get("stg")
    for s in ("a", "b"):
        assert not os.path.exists(os.path.join(root, "app", s, "manifest.json"))
    assert not os.path.exists(os.path.join(root, "ota", "stage.json"))


def _resign(bundle, mutate_manifest, key="main"):
    """Re-sign a bundle after changing its manifest (a validly signed but bad bundle)."""
    sig, mb, man, hl = cli_ota.parse_bundle(bundle)
    data = bundle[hl:]
    mutate_manifest(man)
    mb = json.dumps(man, separators=(",", ":"), sort_keys=True).encode()
    sig = cli_ota.sign(keypair(key)[2], mb)
    return b"MOTA\x01\x00" + struct.pack(">HI", len(sig), len(mb)) + sig + mb, data


def test_keygen_writes_private_0600_and_public(tmp_path):
    path = str(tmp_path / "ota.pem")
    assert cli_ota.keygen(_Args(key_file=path)) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pub = serialization.load_pem_public_key(open(path + ".pub", "rb").read())
    assert pub.key_size == 3072
    assert cli_ota.keygen(_Args(key_file=path)) == 1      # never overwrites a key


def test_rsa_verify_on_device_good_bad_and_timing():
    priv_path, pub_pem, key = keypair()
    other = keypair("other")[2]
    msg = b'{"kind":"app","version":"1.2.3"}'
    good = cli_ota.sign(key, msg)
    bad_key = cli_ota.sign(other, msg)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    r = run_mpy("""
import time, hashlib
from ovms.ota.rsa import parse_key, verify
key = parse_key(%r)
d = hashlib.sha256(%r).digest()
print(verify(d, %r, key), verify(d, %r, key), verify(d, %r, key), verify(d, %r[:-1], key))
print(verify(hashlib.sha256(b'other').digest(), %r, key))
t = time.ticks_us()
for i in range(5):
    verify(d, %r, key)
print("us", time.ticks_diff(time.ticks_us(), t) // 5)
""" % (pub_pem, msg, good, bad_key, flipped, good, good, good))
    l1, l2, l3 = r.stdout.split("\n")[:3]
    assert l1 == "True False False False"
    assert l2 == "False"
    us = int(l3.split()[1])
    print("RSA-3072 verify on the unix micropython binary: %d us" % us)
    assert us < 200000


def test_public_key_formats_and_garbage():
    pub_pem = keypair()[1]
    pub = serialization.load_pem_public_key(pub_pem.encode())
    pkcs1 = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    r = run_mpy("""
from ovms.ota.rsa import parse_key
from ovms.ota.fs import OTAError
a = parse_key(%r); b = parse_key(%r)
print(a == b, a[1], a[2])
for bad in (%r, "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----", "hello", ""):
    try:
        parse_key(bad)
        print("accepted")
    except OTAError as e:
        print("refused:", e)
""" % (pub_pem, pkcs1, ec_pem))
    out = r.stdout.splitlines()
    assert out[0] == "True 65537 384"
    assert out[1] == "refused: bad OTA public key: not an RSA key"
    assert all(ln.startswith("refused: bad OTA public key") for ln in out[2:5]), out


def test_public_key_parsing_is_strict():
    """Only a PEM-armoured, canonical base64, exact-DER RSA key is accepted: no bare base64,
    no junk around the armour, no bytes after the DER, no EC armour swap, no non-minimal DER."""
    import base64
    pub_pem = keypair()[1]
    pub = serialization.load_pem_public_key(pub_pem.encode())
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def pem(d, label="PUBLIC KEY"):
        b = base64.b64encode(d).decode()
        return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (
            label, "\n".join(b[i:i + 64] for i in range(0, len(b), 64)), label)
    long_len = der[:1] + b"\x83\x00" + der[2:]     # length in 3 bytes with a leading zero
    bads = [
        "".join(ln for ln in pub_pem.splitlines() if not ln.startswith("-----")),   # bare base64
        "junk\n" + pub_pem,                                    # text before the armour
        pub_pem + "trailing junk\n",                           # text after the armour
        pem(der + b"\x00"),                                     # a byte after the DER
        pem(der, "RSA PUBLIC KEY"),                             # SPKI under the PKCS#1 armour
        pem(long_len),                                          # non-minimal DER length
        pub_pem.replace("-----END PUBLIC KEY-----", "-----END RSA PUBLIC KEY-----"),
    ]
    r = run_mpy("""
from ovms.ota.rsa import parse_key
from ovms.ota.fs import OTAError
print(parse_key(%r)[2], parse_key(%r)[2])
for bad in %r:
    try:
        parse_key(bad)
        print("accepted")
    except OTAError as e:
        print("refused:", e)
""" % (pub_pem, pem(der), bads))
    out = r.stdout.splitlines()
    assert out[0] == "384 384"
    assert len(out) == 1 + len(bads)
    assert all(ln.startswith("refused: bad OTA public key") for ln in out[1:]), out


def test_ota_key_has_a_fixed_place_not_set_by_config(tmp_path):
    """`config set ota pubkey /ota/stage.json` (sent over MQTT, it pointed the key at a file an
    OTA transfer fills) is refused, and no stored config entry moves the key."""
    root = tmp_path / "root"
    (root / "store").mkdir(parents=True)
    r = run_mpy("""
import ota_boot
ota_boot.ROOT = %r
from ovms import config, shell
config.init(%r)
s = shell.Session("attacker")
s.secure = True
print(shell.run("config set ota pubkey /ota/stage.json", s))
config._data.setdefault("ota", {})["pubkey"] = "/ota/stage.json"   # as if stored long ago
from ovms.ota import rsa as ota_rsa
print(ota_rsa.key_path())
""" % (str(root), str(root / "store")), heap="256K")
    out = r.stdout.splitlines()
    assert out[0].startswith("Error: Unknown instance 'pubkey'"), out
    assert out[1] == "/store/ota.pub"


def test_good_bundle_is_staged_verified_and_config_untouched(tmp_path):
    root = flash_root(tmp_path)
    cfg = snapshot_config(root)
    b = app_bundle(tmp_path, "2.0.0")
    out = _push(tmp_path, root, b)
    assert lines(out, "STAGED") == ["2.0.0"], out
    st = _state(root)
    assert st["stg"] == "a" and not st.get("run")
    check_slot(root, "a", "2.0.0", keypair()[1])
    assert not os.path.exists(os.path.join(root, "ota", "stage.json"))     # cleaned up
    assert not any(f.endswith(".part") for d, _, fs in os.walk(root) for f in fs)
    assert snapshot_config(root) == cfg


@pytest.mark.parametrize("unrenamed", [(-1,), (0, -1)])
def test_cut_between_a_files_last_byte_and_its_rename_resumes(tmp_path, unrenamed):
    """Power cut after a file's last byte reached flash but before its .part was renamed: the
    resumed transfer finishes that file from flash, also when it is the bundle's last file (no
    more data comes for it)."""
    root = flash_root(tmp_path)
    b = app_bundle(tmp_path, "2.0.0")
    p = os.path.join(str(tmp_path), "bundle.bin")
    with open(p, "wb") as f:
        f.write(b)
    bid = cli_ota.bundle_id(b)
    rc, out = device(root, "xfer", p, bid, "512")
    assert not lines(out, "STAGED") and not lines(out, "ERR"), out
    files = cli_ota.parse_bundle(b)[2]["files"]
    for path, n, _ in (files[k] for k in unrenamed):
        full = os.path.join(root, "app", "a", path)
        assert os.path.getsize(full) == n
        os.rename(full, full + ".part")
    rc, out = device(root, "push", p, bid, "512")
    assert lines(out, "RESUME") == [str(len(b))], out
    assert lines(out, "STAGED") == ["2.0.0"], out
    check_slot(root, "a", "2.0.0", keypair()[1])
    assert not any(f.endswith(".part") for d, _, fs in os.walk(root) for f in fs)


def test_real_app_from_this_repo_stages_in_100k_heap(tmp_path):
    """The whole lib/ of this repo, compiled for the device arch, goes through at 1 KiB chunks."""
    root = flash_root(tmp_path)
    arch, mpy = device_arch()
    b = cli_ota.app_bundle(REPO, keypair()[2], "repo-head", arch, mpy)
    out = _push(tmp_path, root, b, ch=1024)
    assert lines(out, "STAGED") == ["repo-head"], out
    man = check_slot(root, "a", "repo-head", keypair()[1])
    want = sorted("lib/" + os.path.relpath(os.path.join(d, f), LIB)[:-3] + ".mpy"
                  for d, _, fs in os.walk(LIB) for f in fs
                  if f.endswith(".py") and f != "ota_boot.py" and "__pycache__" not in d)
    import vehicles
    want += ["lib/veh_%s.mpy" % os.path.basename(d).lower()
             for d in vehicles.vehicle_dirs(os.path.join(REPO, "firmware", "vehicles"))]
    assert sorted(p for p, _, _ in man["files"] if p.endswith(".mpy")) == sorted(want)


@pytest.mark.parametrize("case", ["wrong_key", "tampered_manifest", "wrong_hash", "no_key",
                                  "bad_magic", "truncated_file", "extra_bytes", "wrong_arch",
                                  "bad_path", "oversized_manifest"])
def test_bad_bundles_are_refused_with_a_clear_message(tmp_path, case):
    root = flash_root(tmp_path)
    cfg = snapshot_config(root)
    good = app_bundle(tmp_path, "3.0.0")
    sig, mb, man, hl = cli_ota.parse_bundle(good)
    expect = {
        "wrong_key": "signature verification failed",
        "tampered_manifest": "signature verification failed",
        "wrong_hash": "hash mismatch for lib/",
        "no_key": "no OTA public key on the module (/store/ota.pub): provision one with",
        "bad_magic": "not an OTA bundle",
        "truncated_file": "bundle truncated: %d bytes, its manifest says %d" % (
            len(good) - 100, len(good)),
        "extra_bytes": "oversized bundle: %d bytes, its manifest says %d" % (
            len(good) + 100, len(good)),
        "wrong_arch": "bundle compiled for xtensawin",
        "bad_path": "invalid manifest: bad file path",
        "oversized_manifest": "oversized app bundle",
    }[case]
    if case == "wrong_key":
        b = app_bundle(tmp_path, "3.0.0", key="other")
    elif case == "tampered_manifest":
        b = good[:12 + len(sig)] + mb.replace(b'"3.0.0"', b'"3.9.0"') + good[hl:]
        assert len(b) == len(good) and b != good
    elif case == "wrong_hash":
        i = hl + man["files"][3][1] // 2 + sum(n for _, n, _ in man["files"][:3])
        b = good[:i] + bytes([good[i] ^ 0x55]) + good[i + 1:]
    elif case == "no_key":
        os.remove(os.path.join(root, "store", "ota.pub"))
        b = good
    elif case == "bad_magic":
        b = b"ZIP!" + good[4:]
    elif case == "truncated_file":
        b = good[:len(good) - 100]
    elif case == "extra_bytes":
        b = good + b"\0" * 100
    elif case == "wrong_arch":
        head, data = _resign(good, lambda m: m.update(arch="xtensawin"))
        b = head + data
    elif case == "bad_path":
        head, data = _resign(good, lambda m: m["files"][0].__setitem__(0, "lib/../boot.mpy"))
        b = head + data
    elif case == "oversized_manifest":
        def grow(m):
            m["files"].append(["lib/ovms/huge.bin", 3 << 20, "0" * 64])
            m["size"] += 3 << 20
        head, data = _resign(good, grow)
        b = head + data         # begin declares the full 3 MiB more; refused at the header
        p = os.path.join(str(tmp_path), "big.bin")
        with open(p, "wb") as f:
            f.write(b)
        r = run_mpy("""
import json, ota_boot
ota_boot.ROOT = %r
from ovms import ota
rx = ota.receiver()
n = %d + (3 << 20)
print(rx.handle("begin", json.dumps({"id": "big", "size": n})))
with open(%r, "rb") as f:
    off = 0
    while True:
        d = f.read(1024)
        if not d:
            break
        j = json.loads(rx.handle("data", off.to_bytes(4, "big") + d))
        if "error" in j:
            print("ERR", j["error"])
            break
        off = j["next"]
""" % (root, len(b), p))
        out = r.stdout.splitlines()
        assert any(ln.startswith("ERR " + expect) for ln in out), out
        _nothing_staged(root)
        assert snapshot_config(root) == cfg
        return
    out = _push(tmp_path, root, b)
    errs = lines(out, "ERR")
    assert len(errs) == 1 and errs[0].startswith(expect), out
    assert not lines(out, "STAGED")
    _nothing_staged(root)
    assert snapshot_config(root) == cfg
    # the device stays usable: the good bundle goes through afterwards
    if case != "no_key":
        out = _push(tmp_path, root, good)
        assert lines(out, "STAGED") == ["3.0.0"], out


def test_protocol_misuse_gets_errors_not_crashes(tmp_path):
    """Malformed requests, truncated transfers and data past the end: clear errors, no crash."""
    root = flash_root(tmp_path)
    b = app_bundle(tmp_path, "4.0.0")
    p = os.path.join(str(tmp_path), "b.bin")
    with open(p, "wb") as f:
        f.write(b)
    r = run_mpy("""
import json, ota_boot
ota_boot.ROOT = %r
from ovms import ota
rx = ota.receiver()
def h(op, pl=b""):
    j = json.loads(rx.handle(op, pl))
    print(op, j.get("error") or j.get("next"))
    return j
h("data", b"\\0\\0\\0\\0abc")
h("end")
h("bogus")
h("begin", b"not json")
h("begin", b'{"id": "x"}')
h("begin", b'{"id": "x", "size": 5}')
n = %d
h("begin", json.dumps({"id": "t1", "size": n}))
h("data", b"\\0\\0")
f = open(%r, "rb")
data = f.read(3000)
h("data", (0).to_bytes(4, "big") + data[:1000])
h("data", (0).to_bytes(4, "big") + data[:1000])        # duplicate: ignored, tells where it is
h("data", (2000).to_bytes(4, "big") + data[2000:])     # out of order: ignored
h("data", (1000).to_bytes(4, "big") + data[1000:2000])
h("end")                                               # truncated transfer
st = json.loads(rx.handle("status"))
print("rx", st["rx"]["next"], st["rx"]["size"])
f.seek(2000)
off = 2000
while off < n - 500:
    j = h("data", off.to_bytes(4, "big") + f.read(min(1024, n - 500 - off)))
    off = j["next"]
h("data", off.to_bytes(4, "big") + b"x" * 600)         # 100 bytes past the declared end
h("status")
""" % (root, len(b), p))
    out = r.stdout.splitlines()
    assert out[0] == "data no transfer in progress: send begin first"
    assert out[1] == "end no transfer in progress: send begin first"
    assert out[2] == "bogus unknown OTA operation 'bogus'"
    assert out[3].startswith("begin begin needs a JSON payload")
    assert out[4].startswith("begin begin needs a JSON payload")
    assert out[5] == "begin bundle too small (5 bytes)"
    assert out[6] == "begin 0"
    assert out[7] == "data data chunk without offset"
    assert out[8:12] == ["data 1000", "data 1000", "data 1000", "data 2000"]
    assert out[12] == "end bundle truncated: received 2000 of %d bytes" % len(b)
    assert out[13] == "rx 2000 %d" % len(b)      # a truncated transfer stays resumable
    assert out[-2].startswith("data oversized bundle: more data than the declared")
    assert out[-1].startswith("status")
    _nothing_staged(root)


def test_end_reads_back_in_steps_so_the_loop_keeps_running(tmp_path):
    """The read-back of every staged file at "end" yields after each 1 KB buffer (the server
    runs the event loop between the steps) instead of reading up to 2 MB inside one handler."""
    root = flash_root(tmp_path)
    b = app_bundle(tmp_path, "4.0.1")
    p = os.path.join(str(tmp_path), "b.bin")
    with open(p, "wb") as f:
        f.write(b)
    r = run_mpy("""
import json, ota_boot
ota_boot.ROOT = %r
from ovms import ota
rx = ota.receiver()
n = %d
rx.handle("begin", json.dumps({"id": "s1", "size": n}))
f = open(%r, "rb")
off = 0
while off < n:
    off = json.loads(rx.handle("data", off.to_bytes(4, "big") + f.read(1024)))["next"]
g = rx.steps("end")
k = 0
try:
    while True:
        next(g)
        k += 1
except StopIteration as e:
    j = json.loads(e.args[0])
print("STEPS", k, j.get("staged"), j.get("error"))
""" % (root, len(b), p), path=(compiled_lib(),))
    words = r.stdout.split()
    assert words[0] == "STEPS" and words[2:] == ["4.0.1", "None"], r.stdout
    files = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fs in
                os.walk(os.path.join(root, "app")) for fn in fs if fn.endswith(".mpy") or fn.endswith(".py"))
    assert int(words[1]) >= files // 1024, (words, files)


def test_only_the_owner_or_a_signed_request_aborts_a_transfer(tmp_path):
    """Another client can neither abort the owner's transfer nor begin one over it; the owner
    can, a signed request can, and after a reboot the owner is still known."""
    root = flash_root(tmp_path)
    b = app_bundle(tmp_path, "4.0.0")
    code = """
import json, ota_boot
ota_boot.ROOT = %r
from ovms import ota
rx = ota.receiver()
def h(op, pl=b"", cid=None, signed=False):
    j = json.loads(rx.handle(op, pl, cid, signed))
    print(op, cid, j.get("error") or j.get("next"))
""" % root
    r = run_mpy(code + """
h("begin", json.dumps({"id": "t1", "size": %d}), "owner")
h("data", (0).to_bytes(4, "big") + b"MOTA", "owner")
h("abort", b"", "evil")
h("begin", json.dumps({"id": "t2", "size": 100}), "evil")
h("status")
""" % len(b))
    out = r.stdout.splitlines()
    refused = "a transfer by another client is in progress: only that client (or a signed " \
              "request) may abort or replace it"
    assert out[:4] == ["begin owner 0", "data owner 4", "abort evil " + refused,
                       "begin evil " + refused], out
    # next power-on: the transfer resumes and still belongs to its owner
    r = run_mpy(code + """
print("rx", rx.id, rx.next, rx.owner)
h("abort", b"", "evil")
h("abort", b"", "evil", True)
print("rx", rx.id)
h("begin", json.dumps({"id": "t3", "size": 100}), "owner")
h("abort", b"", "owner")
print("rx", rx.id)
""")
    out = r.stdout.splitlines()
    assert out[0] == "rx t1 4 owner"
    assert out[1] == "abort evil " + refused
    assert out[2].startswith("abort evil ") and "transfer" not in out[2]
    assert out[3] == "rx None"
    assert out[4] == "begin owner 0" and out[6] == "rx None"


def test_key_rotation_only_by_a_bundle_signed_with_the_current_key(tmp_path):
    """A bundle signed with the current key may carry the next key (manifest newkey): once
    staged, only bundles signed with the new key are accepted. A bundle signed with another
    key carrying its own key is refused and changes nothing."""
    root = flash_root(tmp_path)
    key_file = os.path.join(root, "store", "ota.pub")
    other_pub = keypair("other")[1]
    b = app_bundle(tmp_path, "5.0.0", key="other", newkey=other_pub)   # attacker's own key
    out = _push(tmp_path, root, b)
    assert lines(out, "STAGED") == [] and any("signature verification failed" in ln for ln in out)
    assert open(key_file).read() == keypair()[1]
    b = app_bundle(tmp_path, "5.0.0", newkey="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    out = _push(tmp_path, root, b)
    assert lines(out, "STAGED") == [] and any("bad OTA public key" in ln for ln in out), out
    assert open(key_file).read() == keypair()[1]
    b = app_bundle(tmp_path, "5.0.0", newkey=other_pub)                # signed with the current key
    out = _push(tmp_path, root, b)
    assert lines(out, "STAGED") == ["5.0.0"], out
    assert open(key_file).read() == other_pub
    out = _push(tmp_path, root, app_bundle(tmp_path, "5.1.0"))          # old key: refused now
    assert any("signature verification failed" in ln for ln in out), out
    out = _push(tmp_path, root, app_bundle(tmp_path, "5.1.0", key="other"))
    assert lines(out, "STAGED") == ["5.1.0"], out
