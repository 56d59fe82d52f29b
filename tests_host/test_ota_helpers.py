"""Helpers shared by the OTA tests: signing keys, sample app trees, a simulated device on a flash dir."""
import atexit
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from util import LIB, MICROPYTHON, TOOLS, compiled_lib

import cli_ota

VBOARD = os.path.join(TOOLS, "vboard")
OTA_MODULES = ("ota/__init__.py", "ota/rx.py", "ota/app.py", "ota/fw.py", "ota/fs.py", "ota/rsa.py",
               "fsutil.py")
_KEYDIR = tempfile.mkdtemp(prefix="ota-keys-")
atexit.register(shutil.rmtree, _KEYDIR, True)


@pytest.fixture
def broker():
    """A real mosquitto (TLS + plain, test CA) in a dir the broker can read: started as root it
    drops to the `mosquitto` user, which cannot enter pytest's private 0700 tmp_path."""
    from broker import Broker
    d = tempfile.mkdtemp(prefix="ota-broker-")
    os.chmod(d, 0o755)
    b = Broker(os.path.join(d, "b")).start()
    yield b
    b.stop()
    shutil.rmtree(d, ignore_errors=True)


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


_KEYS = {}


def keypair(name="main"):
    """(private key path, public key PEM text, private key object); generated once per run."""
    if name not in _KEYS:
        path = os.path.join(_KEYDIR, name + ".pem")
        assert cli_ota.keygen(_Args(key_file=path)) == 0
        with open(path + ".pub") as f:
            pub = f.read()
        _KEYS[name] = path, pub, cli_ota.load_key(path)
    return _KEYS[name]


@functools.lru_cache(None)
def device_arch():
    """(arch, mpy) the micropython binary reports through ovms.ota.arch()."""
    r = subprocess.run([MICROPYTHON, "-c", "import sys; sys.path.insert(0, %r)\n"
                        "from ovms import ota; print(*ota.arch())" % LIB],
                       capture_output=True, text=True, check=True)
    a, m = r.stdout.split()
    return a, int(m)


def make_app(d, version, crash=False):
    """A small app source tree: the real OTA modules + marker modules + data files."""
    ovms = os.path.join(d, "lib", "ovms")
    os.makedirs(os.path.join(ovms, "pkg"), exist_ok=True)
    os.makedirs(os.path.join(ovms, "data"), exist_ok=True)
    for m in OTA_MODULES:
        os.makedirs(os.path.dirname(os.path.join(ovms, m)), exist_ok=True)
        shutil.copy(os.path.join(LIB, "ovms", m), os.path.join(ovms, m))
    shutil.copy(os.path.join(LIB, "ota_boot.py"), os.path.join(d, "lib"))
    with open(os.path.join(LIB, "ovms", "__init__.py")) as f:
        helpers = f.read().split("\nhooks = {}\n", 1)[1]      # ovms.load, ovms.unload
    with open(os.path.join(ovms, "__init__.py"), "w") as f:
        f.write('"""test app"""\nVERSION = %r\n' % version + helpers)
        if crash:
            f.write('raise RuntimeError("broken build " + VERSION)\n')
    with open(os.path.join(ovms, "util.py"), "w") as f:
        f.write("from ovms import VERSION\n\ndef hello():\n    return 'hello ' + VERSION\n")
    with open(os.path.join(ovms, "pkg", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(ovms, "pkg", "deep.py"), "w") as f:
        f.write("X = [i * i for i in range(10)]\n")
    open(os.path.join(ovms, "data", "empty.txt"), "w").close()
    with open(os.path.join(ovms, "data", "table.json"), "w") as f:
        json.dump({"version": version, "rows": list(range(50))}, f)
    return d


def make_full_app(d, version, crash=False):
    """This repo's whole lib/ as an app of another version (optionally crashing at import)."""
    shutil.copytree(LIB, os.path.join(d, "lib"), ignore=shutil.ignore_patterns("__pycache__"))
    init = os.path.join(d, "lib", "ovms", "__init__.py")
    with open(init) as f:
        src = f.read()
    src = re.sub(r'^VERSION = .*$', "VERSION = %r" % version, src, flags=re.M)
    if crash:
        src += '\nraise RuntimeError("broken build " + VERSION)\n'
    with open(init, "w") as f:
        f.write(src)
    return d


def app_bundle(tmp, version, key="main", crash=False, deadline=None, downgrade=False,
               newkey=None):
    src = make_app(os.path.join(str(tmp), "src-" + version), version, crash)
    arch, mpy = device_arch()
    return cli_ota.app_bundle(src, keypair(key)[2], version, arch, mpy, deadline, downgrade,
                              newkey)


def flash_root(tmp, key="main"):
    """A fresh flash dir: OTA public key and a config file (which updates must never touch)."""
    root = os.path.join(str(tmp), "flash")
    os.makedirs(os.path.join(root, "store"))
    with open(os.path.join(root, "store", "ota.pub"), "w") as f:    # where provisioning puts it
        f.write(keypair(key)[1])
    with open(os.path.join(root, "store", "config.json"), "w") as f:
        json.dump({"vehicle": {"id": "TEST1"}, "server.v3": {"server": "mqtt.example"}}, f)
    return root


def snapshot_config(root):
    with open(os.path.join(root, "store", "config.json"), "rb") as f:
        return f.read()


def check_slot(root, slot, version, pub_pem):
    """Assert slot ("a"/"b") holds a complete app whose signed manifest verifies and matches."""
    base = os.path.join(root, "app", slot)
    with open(os.path.join(base, "manifest.json"), "rb") as f:
        mb = f.read()
    with open(os.path.join(base, "manifest.sig"), "rb") as f:
        sig = f.read()
    pub = serialization.load_pem_public_key(pub_pem.encode())
    pub.verify(sig, mb, padding.PKCS1v15(), hashes.SHA256())    # raises if wrong
    man = json.loads(mb)
    assert man["version"] == version
    for p, n, digest in man["files"]:
        with open(os.path.join(base, p), "rb") as f:
            data = f.read()
        assert len(data) == n and hashlib.sha256(data).hexdigest() == digest, p
    return man


# A simulated device: one process = one power-on. Commands (argv after the flash root):
#   boot            ota_boot.select(), import the app, print "BOOT <slot> <version> <trial>"
#   healthy         ota.mark_healthy()
#   crash           the app raises at start: ota_boot.crashed(exc) (exit code 99 = reset)
#   push FILE ID CH push bundle FILE (resuming a transfer with the same ID), CH bytes per chunk
#   xfer FILE ID CH the same, but stop (power cut) before the "end" request
#   firmware        print the running partition label (esp32 emulation)
# Markers "M <phase>" go to stdout before each step, so a test can cut the power at a phase.
DEVICE = r"""
import sys, os, json
import ota_boot
ota_boot.ROOT = ROOT = sys.argv[1]
args = sys.argv[2:]

def mark(p):
    print("M", p)

def push(path, bid, ch, end=True):
    from ovms import ota
    rx = ota.receiver()
    n = os.stat(path)[6]
    st = json.loads(rx.handle("status", b""))
    r = st.get("rx") or {}
    if r.get("id") == bid and r.get("size") == n:
        off = r["next"]
        print("RESUME", off)
    else:
        mark("begin")
        j = json.loads(rx.handle("begin", json.dumps({"id": bid, "size": n})))
        if "error" in j:
            print("ERR", j["error"])
            return
        off = 0
    with open(path, "rb") as f:
        while off < n:
            mark("xfer")
            f.seek(off)
            j = json.loads(rx.handle("data", off.to_bytes(4, "big") + f.read(ch)))
            if "error" in j:
                print("ERR", j["error"])
                return
            off = j["next"]
    if not end:
        return
    mark("end")
    j = json.loads(rx.handle("end", b""))
    print("ERR " + j["error"] if "error" in j else "STAGED " + j["staged"])

i = 0
while i < len(args):
    a = args[i]
    i += 1
    if a == "boot":
        mark("select")
        slot = ota_boot.select()
        try:
            import ovms
            from ovms import util
            assert util.hello() == "hello " + ovms.VERSION
        except ImportError:
            import ovms     # factory app (the repo's lib) has no util module
        except Exception as e:
            print("BOOT", slot, "-", ota_boot.trial)
            print("CRASH", repr(e))
            ota_boot.crashed(e, 0)
        print("BOOT", slot, ovms.VERSION, ota_boot.trial)
    elif a == "healthy":
        mark("healthy")
        from ovms import ota
        print("HEALTHY", ota.mark_healthy())
    elif a == "crash":
        ota_boot.crashed(RuntimeError("app crashed"), 0)
    elif a in ("push", "xfer"):
        push(args[i], args[i + 1], int(args[i + 2]), a == "push")
        i += 3
    elif a == "status":
        from ovms import ota
        print("STATUS", json.dumps(ota.status()))
    elif a == "firmware":
        import esp32
        print("PART", esp32.Partition(esp32.Partition.RUNNING).info()[4])
print("DONE")
"""


def device_cmd(root, *args, heap="100K", esp32_dir=None):
    """argv + env for one simulated power-on of the device on flash dir `root`."""
    top = os.path.dirname(root)
    vb = os.path.join(top, "vb")        # only the esp32 emulation (not the vdev machine shim)
    code = "import sys\nsys.path[:0] = %r\n" % ([compiled_lib(), vb],) + DEVICE
    path = os.path.join(top, "device.py")
    if not os.path.exists(path):
        os.makedirs(vb, exist_ok=True)
        shutil.copy(os.path.join(VBOARD, "esp32.py"), vb)
        with open(path, "w") as f:
            f.write(code)
    env = dict(os.environ, VBOARD_ESP32=esp32_dir or os.path.join(os.path.dirname(root), "esp32"))
    return [MICROPYTHON, "-X", "heapsize=" + heap, path, root] + list(args), env


def device(root, *args, heap="100K", check=True, timeout=60):
    """Run one power-on; returns (returncode, stdout lines)."""
    cmd, env = device_cmd(root, *args, heap=heap)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode not in (0, 99):
        raise AssertionError("device failed (%d)\n%s\n%s" % (r.returncode, r.stdout, r.stderr))
    return r.returncode, r.stdout.splitlines()


def lines(out, tag):
    return [ln.split(" ", 1)[1] if " " in ln else "" for ln in out if ln.split(" ")[0] == tag]


def test_helpers_sign_and_check(tmp_path):
    """The bundle the helpers build is signed with the test key and lists every lib file."""
    b = app_bundle(tmp_path, "9.9.9")
    sig, mb, man, hl = cli_ota.parse_bundle(b)
    pub = serialization.load_pem_public_key(keypair()[1].encode())
    pub.verify(sig, mb, padding.PKCS1v15(), hashes.SHA256())
    paths = [p for p, _, _ in man["files"]]
    assert "lib/ovms/ota/rx.mpy" in paths and "lib/ovms/data/empty.txt" in paths
    assert not any("ota_boot" in p for p in paths)     # the boot helper is never in a slot
    assert len(b) == hl + man["size"]
