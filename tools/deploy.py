"""deploy: compile lib/ with mpy-cross and copy it plus boot.py/main.py to a module with mpremote."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT_HELPER = "ota_boot.py"     # lives in /lib, never in an OTA slot
SKIP_DIRS = ("__pycache__",)


def tool(name):
    """Path of a toolchain executable: the one beside this Python (venv) first, then PATH."""
    p = os.path.join(os.path.dirname(sys.executable), name)
    return p if os.path.exists(p) else (shutil.which(name) or name)


def lib_files(lib):
    """Sorted relative paths of every deployable file under lib/ (sources and data files)."""
    out = []
    for d, dirs, files in os.walk(lib):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for f in files:
            if f.startswith(".") or f.endswith((".pyc", "~")):
                continue
            out.append(os.path.relpath(os.path.join(d, f), lib).replace(os.sep, "/"))
    return sorted(out)


def compile_lib(lib, out, march="xtensawin", compile_py=True, exclude=()):
    """Compile lib/**.py to out/**.mpy (other files copied). Returns [(relpath in out, abspath)]."""
    done = []
    for rel in lib_files(lib):
        if rel in exclude:
            continue
        src = os.path.join(lib, rel)
        if compile_py and rel.endswith(".py"):
            name, rel = rel, rel[:-3] + ".mpy"
            dst = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            cmd = [tool("mpy-cross")] + (["-march=" + march] if march else []) + \
                ["-o", dst, "-s", name, src]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit("mpy-cross failed for %s:\n%s" % (src, r.stderr))
        else:
            dst = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
        done.append((rel, dst))
    return done


def gather(source, dst):
    """The device's /lib tree in dst: source/lib plus the vehicle modules generated from
    source/firmware/vehicles (veh_<code>.py, see tools/vehicles.py). Returns dst."""
    shutil.copytree(os.path.join(source, "lib"), dst,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    vdir = os.path.join(source, "firmware", "vehicles")
    if os.path.isdir(vdir):
        import vehicles
        try:
            for d in vehicles.vehicle_dirs(vdir):
                vehicles.build(d, dst, lambda m: print("vehicles: warning: " + m,
                                                       file=sys.stderr))
        except vehicles.CompileError as e:
            raise SystemExit("vehicles: error: %s" % e)
    return dst


QSTRS = ".qstrs"     # names of the compiled modules, interned at boot by ota_boot (see there)


def mpy_qstrs(data):
    """The names in an .mpy file's qstr table (MicroPython interns them when it loads it)."""
    if data[:2] != b"M\x06":
        return []
    i = 4

    def uint():
        nonlocal i
        v = 0
        while True:
            b = data[i]
            i += 1
            v = (v << 7) | (b & 0x7F)
            if not b & 0x80:
                return v
    if data[2] & 0x40:              # arch flags follow the header
        uint()
    n = uint()
    uint()                          # number of constant objects
    out = []
    for _ in range(n):
        ln = uint()
        if ln & 1:                  # a static qstr: already in the firmware
            continue
        ln >>= 1
        out.append(data[i:i + ln].decode("utf-8", "replace"))
        i += ln + 1
    return out


def write_qstrs(out_lib, compiled):
    """Write out_lib/.qstrs: every name of the compiled modules, once, in load order."""
    seen = {}
    for rel, path in compiled:
        if path.endswith(".mpy"):
            with open(path, "rb") as f:
                for q in mpy_qstrs(f.read()):
                    if "\n" not in q and q not in seen:
                        seen[q] = None
    p = os.path.join(out_lib, QSTRS)
    with open(p, "w") as f:
        f.write("".join(q + "\n" for q in seen))
    return QSTRS, p


def build(source=REPO, out=None, march="xtensawin", compile_py=True):
    """Build the deploy tree (out/lib/..., out/boot.py, out/main.py); returns out."""
    import tempfile
    out = out or os.path.join(source, "build", "deploy")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with tempfile.TemporaryDirectory() as tmp:
        lib = gather(source, os.path.join(tmp, "lib"))
        done = compile_lib(lib, os.path.join(out, "lib"), march, compile_py)
        if compile_py:
            write_qstrs(os.path.join(out, "lib"), done)
    for f in ("boot.py", "main.py"):
        if os.path.exists(os.path.join(source, f)):
            shutil.copyfile(os.path.join(source, f), os.path.join(out, f))
    return out


# Runs on the device before copying: remove the old app package (stale .py would shadow .mpy).
_CLEAN = """import os
def _rm(p):
    try:
        for e in os.ilistdir(p):
            _rm(p + '/' + e[0])
        os.rmdir(p)
    except OSError:
        try:
            os.remove(p)
        except OSError:
            pass
for _p in %r:
    _rm(_p)
try:
    os.mkdir('/lib')
except OSError:
    pass
"""
# Runs after copying: boot the deployed (factory) app next, keep OTA slots as fallbacks.
_SELECT = """import ota_boot
s = ota_boot.load()
if s.get('run') not in (None, 'f') or s.get('stg'):
    s['prev'] = s.get('run') or s.get('prev')
    s['run'] = 'f'
    s['stg'] = None
    s['tries'] = 0
    ota_boot.save(s)
"""


def mpremote_cmd(out, port):
    """One mpremote command line (steps chained with +) that installs the deploy tree `out`."""
    top = sorted(os.listdir(os.path.join(out, "lib")))
    clean = ["/lib/" + t[:-4] + ".py" if t.endswith(".mpy") else "/lib/" + t for t in top]
    clean += ["/lib/" + t for t in top]
    cmd = [tool("mpremote"), "connect", port, "exec", _CLEAN % (sorted(set(clean)),),
           "+", "fs", "cp", "-r"] + [os.path.join(out, "lib", t) for t in top] + [":/lib/"]
    files = [os.path.join(out, f) for f in ("boot.py", "main.py")
             if os.path.exists(os.path.join(out, f))]
    if files:
        cmd += ["+", "fs", "cp"] + files + [":/"]
    return cmd + ["+", "exec", _SELECT, "+", "soft-reset"]


ARCHS = ("", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
         "xtensa", "xtensawin", "rv32imc", "rv64imc")


def device_arch(port):
    """mpy-cross -march of the device on port (from sys.implementation._mpy)."""
    r = subprocess.run([tool("mpremote"), "connect", port, "exec",
                        "import sys; print('MPY', sys.implementation._mpy)"],
                       capture_output=True, text=True, timeout=60)
    for line in r.stdout.splitlines():
        if line.startswith("MPY "):
            a = (int(line.split()[1]) >> 10) & 0x3F
            if 0 < a < len(ARCHS):
                return ARCHS[a]
    raise SystemExit("deploy: cannot read the architecture of %s:\n%s" % (port, r.stderr))


def deploy(port, source=REPO, march="xtensawin", compile_py=True, dry_run=False, out=None):
    if march == "auto":
        march = device_arch(port)
        print("deploy: device code architecture %s" % march, file=sys.stderr)
    out = build(source, out, march, compile_py)
    c = mpremote_cmd(out, port)
    print("$ " + " ".join(repr(a) if "\n" in a else a for a in c), file=sys.stderr)
    if not dry_run:
        r = subprocess.run(c)
        if r.returncode:
            print("deploy: mpremote failed (%d)" % r.returncode, file=sys.stderr)
            return r.returncode
    return 0


def run(args):
    """`ovms.py deploy` (args: port, arch, source, no_compile, dry_run)."""
    return deploy(args.port, args.source or REPO, args.arch, not args.no_compile, args.dry_run)
