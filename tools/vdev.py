#!/usr/bin/env python3
"""Virtual ESP32: runs the firmware on the micropython unix binary with a pty, a CAN bus and a WDT.

    python tools/vdev.py run --root DIR [--can-log FILE] [--speed X] [--pty PATH] [--heap 100K]

DIR is the module's flash filesystem (populated from the repo on first run). The serial port is a
pty (`pty: <path>` is printed when ready) that mpremote can use like a board's USB serial.
The CAN bus is served on 127.0.0.1 with the socketcand protocol (`socketcand: 127.0.0.1:PORT`,
tools/socketcand.py), so python-can, can-isotp and can.logger can join it.
Killing this process is a power cut; running it again on the same DIR is the next power-on.
"""
import argparse
import ctypes
import hashlib
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tty

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOARD = os.path.join(REPO, "tools", "vboard", "board.py")
EXIT_SOFT, EXIT_SOFT_RAW = 80, 81
PWRON, HARD, WDT, DEEPSLEEP, SOFT = 1, 2, 3, 4, 5
REC = struct.Struct("<IBBH8s")  # CAN record shared with tools/vboard/machine.py
FLAG_RTR, FLAG_EXT = 1, 2


def micropython_binary():
    here = os.path.join(os.path.dirname(sys.executable), "micropython")
    return here if os.path.exists(here) else (shutil.which("micropython") or "micropython")


def parse_candump(path):
    """Frames of a `candump -L` log: (t, controller, record bytes); canN -> controller N+1."""
    import gzip
    frames = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or not parts[0].startswith("("):
                continue
            try:
                t = float(parts[0].strip("()"))
                iface = parts[1]
                ident, _, data = parts[2].partition("#")
                digits = "".join(ch for ch in iface if ch.isdigit())
                ctrl = int(digits or 0) + 1
                fid = int(ident, 16)
                flags = FLAG_EXT if len(ident) > 3 or fid > 0x7FF else 0
                if data.startswith("R"):
                    flags |= FLAG_RTR
                    dlc = int(data[1:] or 0)
                    payload = b""
                else:
                    payload = bytes.fromhex(data)
                    dlc = len(payload)
            except ValueError:
                continue  # a garbled log line is skipped, like a frame with a CRC error
            if dlc > 8:
                continue
            frames.append((t, ctrl, REC.pack(fid, flags, dlc, 0, payload.ljust(8, b"\0"))))
    frames.sort(key=lambda fr: fr[0])
    return frames


def _waiting_in_syscall(pid):
    """True if pid's main thread sleeps in a system call other than a lock (futex)."""
    base = "/proc/%d/task/%d/" % (pid, pid)
    try:
        with open(base + "stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(base + "wchan") as f:
            wchan = f.read()
    except (OSError, IndexError):
        return True   # no /proc: deliver at once
    return state == "S" and wchan not in ("", "0") and "futex" not in wchan


def _tgkill(pid, sig):
    """Signal the main thread of pid (where MicroPython checks for KeyboardInterrupt)."""
    nr = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    if nr:
        try:
            if ctypes.CDLL(None, use_errno=True).syscall(nr, pid, pid, sig) == 0:
                return
        except OSError:
            pass
    os.kill(pid, sig)


def _die_with_parent():
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def heap_bytes(text):
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * mult)


def calibrate_heap(requested, rom=None):
    """Heap for the process: the ESP32 heap asked for, in this host's words, plus what the
    emulation puts in it. Returns (bytes, emulation overhead, word scale).

    Word scale: MicroPython objects are made of machine words and its GC allocates in blocks
    of four words, so an object takes the same number of blocks on the ESP32 (16-byte blocks)
    as on a 64-bit host (32-byte blocks). To hold what a board's heap holds, the host heap
    has the same number of blocks: twice the bytes on a 64-bit host. (Raw byte buffers are
    the exception: denser here, which makes the emulation a little generous for them.)

    Overhead: on a board, machine/network and the REPL are C code and the frozen app's
    bytecode and qstrs are in flash, all outside the GC heap. Here the shims, the ROMFS image
    and the interned qstrs of the frozen modules are in it, so their measured size is added
    on top: a first run imports the frozen app to list its qstrs, a second boots like the
    device (qstrs pre-interned) and measures what the heap holds before the firmware starts."""
    env = dict(os.environ, VDEV_MODE="calibrate")
    for k in ("VDEV_ROOT", "VDEV_HW", "VDEV_ROM", "VDEV_QSTRS"):
        env.pop(k, None)
    cmd = [micropython_binary(), "-X", "heapsize=%d" % (2 * requested + 1024 * 1024), BOARD]
    if rom and os.path.exists(rom + ".qstrs"):          # listed before (cached image)
        env["VDEV_ROM"], env["VDEV_QSTRS"] = rom, rom + ".qstrs"
    elif rom:
        env["VDEV_ROM"] = rom
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, VDEV_IMPORT="1"),
                           timeout=120)
        names = r.stdout.rsplit("n_total_bytes=", 1)[-1].splitlines()[1:]
        with open(rom + ".qstrs", "w") as f:
            for ln in names:
                if ln.startswith("Q(") and ln.endswith(")") and "\n" not in ln[2:-1]:
                    f.write(ln[2:-1] + "\n")
        env["VDEV_QSTRS"] = rom + ".qstrs"
        if _ROM_CACHED and r.returncode == 0 and names:
            _cache_put(rom + ".qstrs", _ROM_CACHED + ".qstrs")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    try:
        words = r.stdout.split("base ", 1)[1].split()
        overhead, scale = int(words[0]), max(1, int(words[2]) // 4)
    except (ValueError, IndexError):
        raise SystemExit("vdev: cannot run micropython: %s" % (r.stderr or r.stdout))
    return requested * scale + (overhead + 1023) // 1024 * 1024, overhead, scale


def _rom_key():
    """Content hash of everything the ROMFS image (and its qstr list) is made from."""
    tools = os.path.join(REPO, "tools")
    files = [os.path.join(tools, n) for n in ("deploy.py", "vehicles.py", "dbc2table.py", "vdev.py")]
    for top in (os.path.join(REPO, "lib"), os.path.join(REPO, "firmware", "vehicles"),
                os.path.join(tools, "vboard")):
        for dp, dn, fn in os.walk(top):
            dn[:] = sorted(d for d in dn if d != "__pycache__")
            files += [os.path.join(dp, f) for f in sorted(fn) if not f.endswith(".pyc")]
    h = hashlib.sha256()
    for p in files:
        h.update(os.path.relpath(p, REPO).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    sys.path.insert(0, tools)
    import deploy
    for exe in (deploy.tool("mpy-cross"), micropython_binary()):
        st = os.stat(exe) if exe and os.path.exists(exe) else None
        h.update(repr((exe, st and (st.st_size, st.st_mtime_ns))).encode())
    h.update(repr(host_march()).encode())
    return h.hexdigest()[:32]


def _rom_cache():
    """Where built ROMFS images are kept, by content hash (VDEV_CACHE; empty: no cache)."""
    d = os.environ.get("VDEV_CACHE", os.path.join(tempfile.gettempdir(),
                                                   "micro-ovms-vdev-%d" % os.getuid()))
    if d:
        os.makedirs(d, exist_ok=True)
    return d


def _cache_put(src, dst):
    """Copy src to dst atomically (parallel virtual devices may store the same image)."""
    tmp = "%s.%d.tmp" % (dst, os.getpid())
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_ROM_CACHED = None    # cache path of the image build_rom returned (for its .qstrs)


def build_rom(run_dir):
    """The firmware's frozen app as a ROMFS image: lib/ compiled for this host + vehicle tables.
    Built once per content: later starts copy the cached image (and its qstr list)."""
    global _ROM_CACHED
    path = os.path.join(run_dir, "app.romfs")
    cache = _rom_cache()
    cached = os.path.join(cache, _rom_key() + ".romfs") if cache else None
    if cached and os.path.exists(cached):
        shutil.copyfile(cached, path)
        if os.path.exists(cached + ".qstrs"):
            shutil.copyfile(cached + ".qstrs", path + ".qstrs")
        _ROM_CACHED = cached
        return path
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import deploy
    from mpremote.romfs import make_romfs
    tree = os.path.join(run_dir, "rom")
    lib = os.path.join(tree, "lib")
    deploy.compile_lib(os.path.join(REPO, "lib"), lib, march=host_march())
    try:
        import vehicles
        for vdir in vehicles.vehicle_dirs():
            src = vehicles.build(vdir, lib, warn=lambda m: None, mpy=True)
            os.remove(src)
    except Exception as e:  # noqa: BLE001  (the device still boots without vehicle tables)
        print("vdev: vehicle tables not built: %s" % e, file=sys.stderr)
        cached = None                    # an incomplete image is not kept
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        img = make_romfs(tree, mpy_cross=False)
    with open(path, "wb") as f:
        f.write(img)
    if cached:
        _cache_put(path, cached)
        for old in sorted((os.path.join(cache, n) for n in os.listdir(cache) if n.endswith(".romfs")),
                          key=os.path.getmtime)[:-8]:      # keep the 8 newest images
            for p in (old, old + ".qstrs"):
                try:
                    os.remove(p)
                except OSError:
                    pass
    _ROM_CACHED = cached
    return path


def host_march():
    """mpy-cross architecture for native/viper code on this host (None: ship sources)."""
    return {"x86_64": "x64", "AMD64": "x64", "i686": "x86"}.get(platform.machine())


def populate(root, with_lib):
    """First power-on: boot.py and main.py on the flash (and lib/, when nothing is frozen)."""
    if os.path.isdir(root) and os.listdir(root):
        return False
    os.makedirs(root, exist_ok=True)
    for name in ("boot.py", "main.py"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), root)
    if with_lib:
        sys.path.insert(0, os.path.join(REPO, "tools"))
        import deploy
        march = host_march()
        deploy.compile_lib(os.path.join(REPO, "lib"), os.path.join(root, "lib"), march=march,
                           compile_py=march is not None)
    return True


class Bus:
    """Replays a candump log onto the controllers the firmware opened; records what it sends."""

    def __init__(self, frames, speed, once, tx_log):
        self.frames, self.speed, self.once = frames, speed, once
        self.conns = {}
        self.cond = threading.Condition()
        self.dropped = 0
        self.tx_log = tx_log
        self.tx_lock = threading.Lock()
        self.cand = None          # socketcand server: sees every frame on the bus

    def _seen(self, ctrl, rec):
        if self.cand is not None and self.cand.active():
            fid, flags, dlc, _, data = REC.unpack(rec[:16])
            self.cand.frame(ctrl, fid, bool(flags & FLAG_EXT), b"" if flags & FLAG_RTR else data[:dlc])

    def inject(self, ctrl, fid, ext, data):
        """A frame from a socketcand client: into the firmware's RX ring like a replayed one."""
        rec = REC.pack(fid, FLAG_EXT if ext else 0, len(data), 0, data.ljust(8, b"\0"))
        conn = self.conns.get(ctrl)
        if conn is None:
            return
        try:
            conn.send(rec, socket.MSG_DONTWAIT if self.speed > 0 else 0)
        except OSError:
            self.dropped += 1

    def attach(self, ctrl, conn):
        conn.send(b"B" if self.speed == 0 else b"P")
        with self.cond:
            old = self.conns.get(ctrl)
            self.conns[ctrl] = conn
            self.cond.notify_all()
        if old:
            try:
                old.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        threading.Thread(target=self._tx, args=(ctrl, conn), daemon=True).start()

    def _tx(self, ctrl, conn):
        while True:
            try:
                rec = conn.recv(64)
            except OSError:
                rec = b""
            if len(rec) < 16:  # EOF, or BYE from CAN.deinit()
                with self.cond:
                    if self.conns.get(ctrl) is conn:
                        del self.conns[ctrl]
                conn.close()
                return
            fid, flags, dlc, _, data = REC.unpack(rec[:16])
            ident = ("%08X" if flags & FLAG_EXT else "%03X") % fid
            body = ("R%d" % dlc) if flags & FLAG_RTR else data[:dlc].hex().upper()
            with self.tx_lock, open(self.tx_log, "a") as f:
                f.write("(%.6f) can%d %s#%s\n" % (time.time(), ctrl - 1, ident, body))
            self._seen(ctrl, rec)

    def inject_state(self, ctrl, state):
        with self.cond:
            conn = self.conns.get(ctrl)
        if conn:
            conn.send(REC.pack(0, 0, 0, 1, bytes([state]).ljust(8, b"\0")))

    def run(self):
        frames = self.frames
        if not frames:
            return
        t0 = frames[0][0]
        period = frames[-1][0] - t0 + 0.01
        start = time.monotonic()
        cycle = 0
        while True:
            for t, ctrl, rec in frames:
                if self.speed > 0:
                    wait = start + ((t - t0) + cycle * period) / self.speed - time.monotonic()
                    if wait > 0.001:
                        time.sleep(wait)
                    self._seen(ctrl, rec)
                    conn = self.conns.get(ctrl)
                    if conn is None:
                        continue
                    try:
                        conn.send(rec, socket.MSG_DONTWAIT)
                    except OSError:
                        self.dropped += 1  # device frozen or rebooting: the bus does not wait
                else:
                    self._send_paced(ctrl, rec)
                    self._seen(ctrl, rec)
            if self.once:
                return
            cycle += 1

    def _send_paced(self, ctrl, rec):
        while True:
            with self.cond:
                while not self.conns:
                    self.cond.wait()
                conn = self.conns.get(ctrl)
            if conn is None:
                return
            try:
                conn.send(rec)
                return
            except OSError:
                with self.cond:
                    if self.conns.get(ctrl) is conn:
                        del self.conns[ctrl]


RUN_PREFIX = "vdev-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by someone else
    return True


def _cwds():
    """Working directories of the processes we can see (a board runs inside its run dir)."""
    seen = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return seen
    for p in pids:
        try:
            seen.add(os.readlink("/proc/%s/cwd" % p))
        except OSError:
            pass
    return seen


def clean_stale_run_dirs(tmp=None, min_age=600):
    """Remove run dirs of virtual devices that are gone (a power cut kills vdev before it can
    clean up). vdev-<pid>-*: gone when that process is; older unnamed ones: when no process
    works inside them and they are older than min_age seconds. Returns the removed paths."""
    tmp = tmp or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(RUN_PREFIX)]
    except OSError:
        return []
    removed, cwds = [], None
    for n in names:
        path = os.path.join(tmp, n)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = n[len(RUN_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and "-" in n[len(RUN_PREFIX):]:
            if _pid_alive(int(pid)):
                continue
        else:
            try:
                if time.time() - os.stat(path).st_mtime < min_age:
                    continue
            except OSError:
                continue
            if cwds is None:
                cwds = _cwds()
            if any(c == path or c.startswith(path + os.sep) for c in cwds):
                continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class Device:
    def __init__(self, a):
        self.a = a
        self.root = os.path.abspath(a.root)
        clean_stale_run_dirs()
        self.run_dir = tempfile.mkdtemp(prefix="%s%d-" % (RUN_PREFIX, os.getpid()))
        self.hw_path = os.path.join(self.run_dir, "hw.sock")
        self.child = None
        # reentrant: a stop signal's handler runs on the main thread, which may hold it (in a
        # boot, or in the handler of a first signal: Ctrl-C reaches sim.py's whole group,
        # and sim.py then terminates the device too)
        self.child_lock = threading.RLock()
        self.pending_in = bytearray()
        self.next_boot = None  # (mode, cause) requested by the firmware
        self.cause = PWRON
        self.wdt_timeout = 0
        self.wdt_fed = 0.0
        self.last_sigint = None  # when the running code was interrupted (None: not yet)
        self.stretch = 0         # counts RUN state changes (an interrupt is for one stretch)
        self.running = False  # the board runs code (Ctrl-C interrupts) rather than reading input
        self.booting = True   # powered on, main.py not started yet
        self.held_intr = False
        self.intr_lock = threading.Lock()
        self.ctl_conn = None
        self.wifi = 1
        self.uid = hashlib.sha256(os.path.realpath(self.root).encode()).hexdigest()[:12]
        tx_log = a.tx_log or (self.root.rstrip("/") + ".cantx.log")
        frames = parse_candump(a.can_log) if a.can_log else []
        self.bus = Bus(frames, a.speed, a.once, tx_log)
        self.gps = b""
        if getattr(a, "gps_log", None):
            with open(a.gps_log, "rb") as f:
                self.gps = b"".join(ln for ln in f if ln.startswith(b"$"))
        self.console = open(a.log, "ab") if a.log else None

    # --- hardware socket: control link and CAN controllers ---
    def serve_hw(self):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(self.hw_path)
        srv.listen(8)
        while True:
            conn, _ = srv.accept()
            hello = conn.recv(64).split()
            if hello[:1] == [b"CTL"]:
                self.ctl_conn = conn
                conn.send(b"WIFI %d" % self.wifi)
                threading.Thread(target=self._ctl, args=(conn,), daemon=True).start()
            elif hello[:1] == [b"CAN"]:
                self.bus.attach(int(hello[1]), conn)
            elif hello[:1] == [b"UART"] and len(hello) == 3:
                threading.Thread(target=self._uart, args=(conn, int(hello[2])), daemon=True).start()
            else:
                conn.close()

    def _uart(self, conn, baud):
        """A GPS receiver on the board's UART: the --gps-log bytes at baud / 10 bytes per
        second, in 100-ms records, looped (comment lines of gpsd's captures left out)."""
        data = self.gps
        if not data:
            return              # silent receiver: the connection stays open, nothing comes
        per = max(1, baud // 100)
        k = 0
        t = time.monotonic()
        while True:
            chunk = bytes(data[(k + i) % len(data)] for i in range(per))
            k = (k + per) % len(data)
            try:
                conn.send(chunk)
            except OSError:
                return
            t += 0.1
            time.sleep(max(0, t - time.monotonic()))

    def _ctl(self, conn):
        while True:
            try:
                msg = conn.recv(64)
            except OSError:
                return
            if not msg:
                return
            words = msg.split()
            cmd = words[0]
            if cmd == b"FEED":
                self.wdt_fed = time.monotonic()
            elif cmd == b"WDT":
                self.wdt_timeout = int(words[1]) / 1000.0
                self.wdt_fed = time.monotonic()
            elif cmd == b"RESET":      # esp_restart(): ESP_RST_SW, which the port reads as HARD
                self.reboot("power", HARD)
            elif cmd == b"SOFT":
                self.reboot("soft", SOFT)
            elif cmd == b"DEEPSLEEP":
                self.reboot("power", DEEPSLEEP)
            elif cmd == b"RUN":
                self._run_state(words[1:2], conn)

    def _run_state(self, how, conn):
        with self.intr_lock:
            self.stretch += 1
            self.last_sigint = None
            if how == [b"B"]:      # boot.py: a Ctrl-C now is held for main.py
                self.running = False
                return
            self.booting = False
            if how == [b"M"]:      # main.py starts, unless Ctrl-C was pressed during power-on
                self.running = not self.held_intr
                self.held_intr = False
                conn.send(b"GO" if self.running else b"STOP")
                return
            self.running = how == [b"1"]
            if not self.running:
                self.held_intr = False
                conn.send(b"IDLE")  # no interrupt for the code that ended can follow now

    def reboot(self, mode, cause):
        self.next_boot = (mode, cause)
        with self.child_lock:
            if self.child and self.child.poll() is None:
                self.child.kill()

    def watchdog(self):
        while True:
            time.sleep(0.05)
            if self.wdt_timeout and time.monotonic() - self.wdt_fed > self.wdt_timeout:
                self.say("watchdog timeout: resetting")
                self.wdt_timeout = 0
                self.reboot("power", WDT)

    # --- host control (tests): wifi 0|1, rssi N, busoff|active [controller] ---
    def serve_control(self):
        path = os.path.join(self.run_dir, "control.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        self.control_path = path
        threading.Thread(target=self._control_loop, args=(srv,), daemon=True).start()

    def _control_loop(self, srv):
        states = {"active": 1, "warning": 2, "passive": 3, "busoff": 4}
        while True:
            conn, _ = srv.accept()
            with conn:
                words = conn.recv(256).decode(errors="replace").split()
                reply = "ok"
                if words[:1] == ["wifi"] and len(words) == 2:
                    self.wifi = int(words[1])
                    self._push(b"WIFI %d" % self.wifi)
                elif words[:1] == ["rssi"] and len(words) == 2:
                    self._push(b"RSSI %d" % int(words[1]))
                elif words[:1] and words[0] in states:
                    self.bus.inject_state(int(words[1]) if len(words) > 1 else 1, states[words[0]])
                elif words[:1] == ["status"]:
                    reply = "dropped %d wdt %.1f" % (self.bus.dropped, self.wdt_timeout)
                else:
                    reply = "error: unknown command"
                conn.sendall(reply.encode() + b"\n")

    def _push(self, msg):
        try:
            if self.ctl_conn:
                self.ctl_conn.send(msg)
        except OSError:
            pass

    # --- serial port ---
    def open_pty(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tty.setraw(self.master)
        os.set_blocking(self.master, False)
        self.pty_name = os.ttyname(self.slave)
        if self.a.pty:
            if os.path.lexists(self.a.pty):
                os.unlink(self.a.pty)
            os.symlink(self.pty_name, self.a.pty)

    def host_to_device(self):
        import select
        while True:
            select.select([self.master], [], [])
            try:
                data = os.read(self.master, 4096)
            except BlockingIOError:
                continue
            except OSError:
                time.sleep(0.05)
                continue
            for i, chunk in enumerate(data.split(b"\x03")):
                if i:
                    self.interrupt()
                if chunk:
                    self.to_device(chunk)

    def interrupt(self):
        """Ctrl-C as a board's UART handles it: a KeyboardInterrupt while code runs, a plain
        character while the REPL reads input (never landing inside the REPL protocol), and at
        power-on held: main.py then does not start (a host connecting wants the REPL; a signal
        would land in the middle of the app's imports)."""
        with self.intr_lock:
            if self.running:
                self._sigint()
            elif self.booting:
                self.held_intr = True
            else:
                self.to_device(b"\x03")

    def _sigint(self):
        # (called with intr_lock held) One SIGINT per stretch of running code (another after
        # 2 s): a second SIGINT that arrives before the first became a KeyboardInterrupt makes
        # the unix port exit from inside its signal handler.
        with self.child_lock:
            ch = self.child
        now = time.monotonic()
        if ch and ch.poll() is None and (self.last_sigint is None or now - self.last_sigint > 2.0):
            self.last_sigint = now
            threading.Thread(target=self._deliver, args=(ch.pid, self.stretch),
                             daemon=True).start()

    def _deliver(self, pid, stretch):
        # The KeyboardInterrupt is raised where the interpreter next looks, which is unsafe
        # inside a garbage collection or with an internal lock held (the heap stays locked, or
        # the next qstr deadlocks). On a board the UART interrupt only sets a flag too, but
        # there is no GC thread handshake; here the signal waits (up to 1 s) for the main
        # thread to sleep in a system call (poll, sleep, read) that is not a lock.
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not _waiting_in_syscall(pid):
            time.sleep(0.001)
        with self.intr_lock:
            if self.running and self.stretch == stretch:
                _tgkill(pid, signal.SIGINT)

    def to_device(self, data):
        with self.child_lock:
            ch = self.child
            if ch is None or ch.poll() is not None:
                self.pending_in += data
                return
        try:
            os.write(ch.stdin.fileno(), data)
        except OSError:
            self.pending_in += data

    def device_to_host(self, ch):
        fd = ch.stdout.fileno()
        prev_cr = False
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            if self.console:
                self.console.write(data)
                self.console.flush()
            out = bytearray()
            for b in data:  # a board's console is cooked: lone \n goes out as \r\n
                if b == 10 and not prev_cr:
                    out += b"\r"
                out.append(b)
                prev_cr = b == 13
            self.emit(bytes(out))

    def emit(self, data):
        try:
            os.write(self.master, data)
        except OSError:
            pass  # nobody reading the port: output is lost, as on a board's USB serial

    def say(self, text):
        print("vdev: " + text, file=sys.stderr, flush=True)

    # --- power ---
    def boot(self, mode):
        env = dict(os.environ, VDEV_ROOT=self.root, VDEV_HEAP=str(heap_bytes(self.a.heap)),
                   VDEV_ROM=self.rom or "", VDEV_QSTRS=(self.rom + ".qstrs") if self.rom else "", VDEV_HW=self.hw_path, VDEV_MODE=mode,
                   VDEV_CAUSE=str(self.cause), VDEV_UID=self.uid, VDEV_CAN_RING=str(self.a.ring),
                   VDEV_FLASH="1" if self.a.flash_costs == "on" else "0")
        with self.intr_lock:
            self.running, self.booting, self.held_intr = False, True, False
            self.last_sigint = None
            self.stretch += 1
        with self.child_lock:
            self.child = subprocess.Popen(
                [micropython_binary(), "-X", "heapsize=%d" % self.heap, BOARD],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, cwd=self.run_dir, preexec_fn=_die_with_parent)
            ch = self.child
            if self.pending_in:
                data, self.pending_in = bytes(self.pending_in), bytearray()
                try:
                    os.write(ch.stdin.fileno(), data)
                except OSError:
                    pass
        threading.Thread(target=self.device_to_host, args=(ch,), daemon=True).start()
        return ch

    def run(self):
        self.rom = None if self.a.no_frozen else build_rom(self.run_dir)
        if populate(self.root, with_lib=self.rom is None):
            self.say("flash %s populated from the repo" % self.root)
        self.heap, overhead, scale = calibrate_heap(heap_bytes(self.a.heap), self.rom)
        self.say("heap %s for the firmware (ESP32 bytes; x%d on this %d-bit host, same number of "
                 "GC blocks) + %d bytes of board emulation and frozen app"
                 % (self.a.heap, scale, 32 * scale, overhead))
        self.open_pty()
        for fn in (self.serve_hw, self.watchdog, self.host_to_device, self.bus.run):
            threading.Thread(target=fn, daemon=True).start()
        self.serve_control()
        sys.path.insert(0, os.path.join(REPO, "tools"))
        import socketcand
        self.bus.cand = socketcand.Server(self.bus.inject, self.a.socketcand_port)
        threading.Thread(target=self.bus.cand.serve, daemon=True).start()
        mode = "power"
        ch = self.boot(mode)
        print("pty: %s" % self.pty_name, flush=True)
        print("control: %s" % self.control_path, flush=True)
        print("heap: %d x%d" % (heap_bytes(self.a.heap) * scale, scale), flush=True)
        print("can-tx: %s" % self.bus.tx_log, flush=True)
        print("socketcand: 127.0.0.1:%d" % self.bus.cand.port, flush=True)
        while True:
            rc = ch.wait()
            req, self.next_boot = self.next_boot, None
            if req:
                mode, cause = req
                if cause is not None:
                    self.cause = cause
            elif rc == EXIT_SOFT:
                mode, self.cause = "soft", SOFT
            elif rc == EXIT_SOFT_RAW:
                mode, self.cause = "softraw", SOFT
            else:                   # a panic: ESP_RST_PANIC, which the port reads as HARD
                self.say("device stopped (exit %s): rebooting" % rc)
                self.emit(b"\r\nvdev: device crashed (exit %d), rebooting\r\n" % rc)
                mode, self.cause = "power", HARD
            if mode == "power":
                self.wdt_timeout = 0  # a hardware reset stops the watchdog
                time.sleep(0.1)
            ch.stdout.close()
            ch.stdin.close()
            ch = self.boot(mode)

    def cleanup(self):
        with self.child_lock:
            if self.child and self.child.poll() is None:
                self.child.kill()
        if self.a.pty and os.path.islink(self.a.pty):
            os.unlink(self.a.pty)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def board_ring():
    """The CAN RX ring length the firmware is built with (firmware/boards/MICRO_OVMS)."""
    import re
    h = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "firmware",
                     "boards", "MICRO_OVMS", "mpconfigboard.h")
    m = re.search(r"^#define MICRO_OVMS_CAN_RX_RING\s+\((\d+)\)", open(h).read(), re.M)
    return int(m.group(1))


def main(argv=None):
    p = argparse.ArgumentParser(prog="vdev.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="power on a virtual device")
    r.add_argument("--root", required=True, help="flash filesystem directory")
    r.add_argument("--can-log", help="candump -L log replayed on the bus (can0 -> CAN(1))")
    r.add_argument("--speed", type=float, default=1.0,
                   help="replay speed factor (0 = as fast as the firmware drains)")
    r.add_argument("--pty", help="make PATH a link to the serial port")
    r.add_argument("--heap", default="100K", help="the ESP32's MicroPython GC heap to emulate (about 110K without PSRAM; "
                        "scaled to the host's word size)")
    r.add_argument("--once", action="store_true", help="play the log once (default: loop)")
    r.add_argument("--ring", type=int, default=board_ring(),
                   help="CAN RX ring slots (default: the board's MICRO_OVMS_CAN_RX_RING, %d; "
                        "the stock ESP32 driver has 16)" % board_ring())
    r.add_argument("--tx-log", help="where frames sent by the firmware go (default DIR.cantx.log)")
    r.add_argument("--log", help="also append the device console output to this file")
    r.add_argument("--flash-costs", choices=("on", "off"), default="on",
                   help="flash writes, renames and removes block the interpreter as long as the "
                        "ESP32's flash would (sector erase 45 ms, page program 0.7 ms)")
    r.add_argument("--socketcand-port", type=int, default=0,
                   help="serve the CAN bus with the socketcand protocol on 127.0.0.1:PORT (default: a free port)")
    r.add_argument("--gps-log", help="NMEA log a GPS receiver on the board's UART sends, at its "
                        "baud rate, looped (config set gps enabled yes)")
    r.add_argument("--no-frozen", action="store_true",
                   help="no frozen app in the firmware (ROMFS): run lib/ from the flash only")
    a = p.parse_args(argv)
    dev = Device(a)

    def stop(*_):
        dev.cleanup()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        dev.run()
    finally:
        dev.cleanup()


if __name__ == "__main__":
    main()
