"""Virtual board: the ESP32's SPI flash costs for file writes, renames and removes.

Once installed, writing a file on the flash blocks the interpreter as long as the chip would
(datasheet typicals: 4 KB sector erase 45 ms, 256-byte page program 0.7 ms):
- data: a page program for every 256-byte page a write starts, a sector erase for every 4 KB
  sector it starts (LittleFS writes data into fresh, erased blocks);
- appending to a file that ends inside a block (the first write after opening it for append,
  after a seek or after a flush, i.e. lfs_file_sync): LittleFS never programs a block it has committed again, it copies the
  partial last block into a fresh one, so a sector erase plus the pages it copies (files of
  up to 128 bytes live inline in the metadata and skip this);
- metadata (closing a written file, flushing one, rename, remove, mkdir, rmdir): one page program, and every
  16th time a sector erase (the metadata block is compacted).
Reads cost nothing. The wait is a sleep of the interpreter's thread: asyncio tasks stall, the
CAN "ISR" thread keeps running, as on the board."""
import builtins
import io
import sys
import time

ERASE_US = 45000
PAGE_US = 700
INLINE = 128        # LittleFS inline_max with MicroPython's 4 x 32-byte cache
commits = [0]
busy_us = [0]       # total time spent waiting for the flash
erases = [0]        # sector erases so far (each stops the ESP32's caches, both cores, 45 ms)
_prefix = [""]


def wait(us):
    if us:
        busy_us[0] += us
        time.sleep_us(us)


def commit():
    commits[0] += 1
    if commits[0] % 16 == 0:
        erases[0] += 1
        wait(PAGE_US + ERASE_US)
    else:
        wait(PAGE_US)


def starts(pos, n, unit):
    """How many multiples of unit lie in [pos, pos + n)."""
    return (pos + n + unit - 1) // unit - (pos + unit - 1) // unit if n > 0 else 0


class File(io.IOBase):
    """A file opened for writing on the flash: each write costs the chip's program/erase time."""

    def __init__(self, f, append):
        self._f = f
        self._pos = f.seek(0, 2) if append else 0
        self._dirty = False
        self._fresh = True      # the next write continues a committed block (copy-on-write)
        self._synced = True

    def write(self, b):
        n = self._f.write(b)
        if n:
            if self._fresh:
                self._fresh = False
                part = self._pos % 4096
                if self._pos > INLINE and part:
                    erases[0] += 1
                    wait(ERASE_US + starts(0, part, 256) * PAGE_US)
            e = starts(self._pos, n, 4096)
            erases[0] += e
            wait(starts(self._pos, n, 256) * PAGE_US + e * ERASE_US)
            self._pos += n
            self._dirty = True
            self._synced = False
        return n

    def readinto(self, b):
        n = self._f.readinto(b)
        self._pos += n or 0
        return n

    def read(self, n=-1):
        b = self._f.read(n)
        self._pos += len(b)
        return b

    def seek(self, off, whence=0):
        p = self._f.seek(off, whence)
        if p != self._pos:
            self._fresh = True
        self._pos = p
        return p

    def tell(self):
        return self._pos

    def flush(self):
        # lfs_file_sync: the written data is committed; writing on copies the last block
        self._f.flush()
        if not self._synced:
            self._synced = True
            self._fresh = True
            commit()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None
            if self._dirty and not self._synced:
                commit()

    def ioctl(self, req, arg):
        if req == 1:        # MP_STREAM_FLUSH
            self.flush()
            return 0
        if req == 4:        # MP_STREAM_CLOSE
            self.close()
            return 0
        return -1

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


_open = builtins.open


def _on_flash(name):
    p = _prefix[0]
    return not p or (isinstance(name, str) and name.startswith(p))


def open(name, mode="r", *a, **k):
    f = _open(name, mode, *a, **k)
    if _on_flash(name):
        for c in mode:
            if c in "wax+":
                return File(f, "a" in mode)
    return f


class OS:
    """os with metadata costs for rename, remove, mkdir and rmdir on the flash."""

    def __init__(self, base):
        self._os = base

    def __getattr__(self, k):
        return getattr(self._os, k)

    def rename(self, a, b):
        self._os.rename(a, b)
        if _on_flash(a):
            commit()

    def remove(self, p):
        self._os.remove(p)
        if _on_flash(p):
            commit()

    def mkdir(self, p):
        self._os.mkdir(p)
        if _on_flash(p):
            commit()

    def rmdir(self, p):
        self._os.rmdir(p)
        if _on_flash(p):
            commit()


def install(base_os, prefix=""):
    """Charge flash costs from now on for files under prefix ("": all): open() and the `os`
    module that code imports from now on."""
    _prefix[0] = prefix
    builtins.open = open
    sys.modules["os"] = OS(base_os)
