"""Virtual ESP32 boot ROM + REPL: mounts the flash dir, runs boot.py/main.py, serves the (raw) REPL."""
import gc
import os
import select
import sys

import _hw

_hw.start()
import machine  # noqa: E402,F401  (shims load before the flash replaces the host filesystem)
import network  # noqa: E402,F401
import ntptime  # noqa: E402,F401
import flash  # noqa: E402  (loaded always: the heap calibration counts it)

try:
    import esp32  # noqa: F401
except ImportError:
    pass

EXIT_SOFT = 80      # soft reset, friendly REPL next
EXIT_SOFT_RAW = 81  # soft reset, raw REPL next (main.py skipped, as on a board)
BANNER = ("MicroPython v1.29.0 on 2026-07-05; ESP32 module (virtual micro-ovms device) with ESP32\r\n"
          'Type "help()" for more information.\r\n')

root = os.getenv("VDEV_ROOT")
mode = os.getenv("VDEV_MODE") or "power"
rom = os.getenv("VDEV_ROM")  # ROMFS image: the firmware's frozen app, as on a board's romfs partition
if rom:
    with open(rom, "rb") as f:
        rom = f.read()


def preintern(path):
    """Intern the frozen app's names now, while the heap is empty.

    On a board they sit in the firmware's ROM qstr pool. Interned later, at import time, they
    would need ever larger contiguous pool blocks from a fragmented heap."""
    n = 0
    try:
        with open(path) as f:
            for line in f:
                getattr(None, line[:-1], None)
                n += 1
                if n % 16 == 0:
                    gc.collect()  # keeps the string chunks packed instead of between garbage
    except OSError:
        pass


if os.getenv("VDEV_QSTRS"):
    preintern(os.getenv("VDEV_QSTRS"))
if root:
    os.umount("/")
    os.mount(os.VfsPosix(root), "/")
    os.chdir("/")
if rom:
    import vfs
    vfs.mount(vfs.VfsRom(rom), "/rom")
sys.path[:] = ["", ".frozen", "/rom/lib", "/lib"] if rom else ["", ".frozen", "/lib"]


class _OS:
    """os with a working rename(): the unix port's VfsPosix mounted with a root builds both
    paths of rename() in one buffer (rename(a, b) became rename(b, b)); relative paths work."""

    def __getattr__(self, k):
        return getattr(os, k)

    def rename(self, a, b):
        cwd = os.getcwd()
        a = a if a.startswith("/") else cwd.rstrip("/") + "/" + a
        b = b if b.startswith("/") else cwd.rstrip("/") + "/" + b
        os.chdir("/")
        try:
            os.rename(a[1:], b[1:])
        finally:
            os.chdir(cwd)


if root:
    sys.modules["os"] = _OS()
    if os.getenv("VDEV_FLASH") == "1":   # vdev's default: writes cost the ESP32 flash's time
        flash.install(sys.modules["os"])

out = sys.stdout
inp = sys.stdin.buffer
_poll = select.poll()
_poll.register(sys.stdin, select.POLLIN)
ns = {"__name__": "__main__"}


def write(s):
    out.write(s)


def getc():
    """Next input byte; Ctrl-C (delivered as SIGINT by the host) reads as 3."""
    while True:
        try:
            if _poll.poll(200):
                c = inp.read(1)
                if not c:
                    sys.exit(0)  # the host closed the port: power off
                return c[0]
        except KeyboardInterrupt:
            return 3


def soft_reset(raw):
    write("MPY: soft reboot\r\n")
    sys.exit(EXIT_SOFT_RAW if raw else EXIT_SOFT)


def run(code, how=_hw.RUN):
    """Execute compiled code in the REPL namespace; Ctrl-C interrupts it only meanwhile."""
    if not _hw.running(how):
        raise KeyboardInterrupt  # Ctrl-C during power-on: main.py does not start
    exec(code, ns)


def run_file(name):
    """Run a file from flash in the REPL namespace; True if it ended with SystemExit."""
    try:
        os.stat(name)
    except OSError:
        return False
    try:
        with open(name) as f:
            src = f.read()
        run(compile(src, name, "exec"), _hw.BOOT if name == "boot.py" else _hw.MAIN)
    except SystemExit:
        return True
    except BaseException as e:  # noqa: B036  (a board prints every escape, incl. KeyboardInterrupt)
        sys.print_exception(e)
    return False


def execute(src, mode_, eof):
    """Compile and run source; with eof, frame stdout/stderr with Ctrl-D like the raw REPL."""
    exit_ = False
    try:
        try:
            run(compile(src, "<stdin>", mode_))
        finally:
            _hw.running(_hw.REPL)
            if eof:
                write("\x04")
    except SystemExit:
        exit_ = True
    except BaseException as e:  # noqa: B036
        sys.print_exception(e)
    if eof:
        write("\x04")
    return exit_


def raw_paste():
    """Raw-paste mode: flow-controlled upload, then compile and run."""
    window = 128
    write("R\x01")
    out.buffer.write(bytes((window & 255, window >> 8)))
    buf = bytearray()
    left = window
    while True:
        c = getc()
        if c == 4:
            write("\x04")
            break
        if c == 3:
            write("\x04")
            return False
        buf.append(c)
        left -= 1
        if left == 0:
            write("\x01")
            left = window
    return execute(bytes(buf), "exec", True)


def raw_repl():
    """The raw REPL (Ctrl-A); returns when the host asks for the friendly REPL (Ctrl-B)."""
    _hw.running(_hw.REPL)
    while True:
        write("raw REPL; CTRL-B to exit\r\n")
        restart = False
        while not restart:
            write(">")
            line = bytearray()
            while True:
                c = getc()
                if c == 1:
                    if len(line) == 2 and line[0] == 5 and line[1] == ord("A"):
                        if raw_paste():
                            soft_reset(True)
                        break
                    restart = True
                    break
                if c == 2:
                    write("\r\n")
                    return
                if c == 3:
                    line = bytearray()
                elif c == 4:
                    write("OK")
                    if not line:
                        write("\r\n")
                        soft_reset(True)
                    if execute(bytes(line), "exec", True):
                        soft_reset(True)
                    break
                else:
                    line.append(c)


def readline(prompt):
    """Friendly REPL line editor. Returns str, or an int control code (1, 2, 3, 4)."""
    write(prompt)
    line = bytearray()
    while True:
        c = getc()
        if c in (1, 2, 4) and not line:
            return c
        if c == 3:
            write("\r\n")
            return 3
        if c in (10, 13):
            write("\r\n")
            return line.decode()
        if c in (8, 127):
            if line:
                line.pop()
                write("\b \b")
        elif c == 27:
            getc()
            getc()
        elif c >= 32 or c == 9:
            line.append(c)
            out.buffer.write(bytes((c,)))


def needs_more(src):
    s = src.rstrip()
    if s.endswith(":") or s.endswith("\\"):
        return True
    depth = 0
    for ch in src:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth > 0


def friendly_repl():
    _hw.running(_hw.REPL)
    write(BANNER)
    while True:
        r = readline(">>> ")
        if r == 1:
            write("\r\n")
            raw_repl()
            continue
        if r == 2:
            write("\r\n" + BANNER)
            continue
        if r == 4:
            write("\r\n")
            soft_reset(False)
        if r == 3 or not r.strip():
            continue
        src = r
        if needs_more(src):
            while True:
                more = readline("... ")
                if more == 3:
                    src = ""
                    break
                if not isinstance(more, str) or not more.strip():
                    break
                src += "\n" + more
            if not src:
                continue
        if execute(src + "\n", "single", False):
            soft_reset(False)


def _modules(d, pkg):
    for name, kind, *_ in os.ilistdir(d):
        if kind == 0x4000:
            yield from _modules(d + "/" + name, pkg + name + ".")
        elif name.endswith(".mpy"):
            yield pkg + name[:-4]


def calibrate():
    """Print what the heap holds before the firmware starts (board emulation, ROMFS image,
    pre-interned qstrs: all in flash or C on a board); with VDEV_IMPORT, import the frozen app
    and list its qstrs instead (for pre-interning)."""
    import micropython
    gc.collect()
    write("base %d word %d\n" % (gc.mem_alloc(), 8 if sys.maxsize > 1 << 32 else 4))
    if rom and os.getenv("VDEV_IMPORT"):
        micropython.qstr_info()
        for m in _modules("/rom/lib", ""):
            try:
                __import__(m)
            except Exception:  # noqa: BLE001  (modules needing hardware are simply skipped)
                pass
        micropython.qstr_info(1)
    sys.exit(0)


def main():
    if mode == "calibrate":  # the host sizes the heap so the firmware gets what it asked for
        calibrate()
    if run_file("boot.py"):
        soft_reset(mode == "softraw")
    if mode == "softraw":
        raw_repl()
    elif run_file("main.py"):
        soft_reset(False)
    friendly_repl()


try:
    main()
except KeyboardInterrupt:
    write("\r\n")
while True:
    try:
        friendly_repl()
    except KeyboardInterrupt:
        write("\r\n")
