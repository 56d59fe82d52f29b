"""Persistent FIFO of outgoing messages on flash: bounded, atomic rewrite, survives power cuts."""
# File layout (binary, one file):
#   b"OBX1 <dropped> <next seq>\n"
#   per record: b"<seq> <length> <crc32 hex>\n" + body + b"\n",  body = topic + b"\n" + payload
# Every change writes <path>.tmp and renames it over <path> (atomic on LittleFS and POSIX; on
# FAT the old file is removed first and a leftover .tmp is recovered at start). A record whose
# header or CRC does not check (torn or damaged file) ends the queue: it and everything after
# it are dropped and counted. Records are streamed one at a time, so RAM use is one record.
import os
from binascii import crc32
from micropython import const
from ovms import fsutil

_HDR_MAX = const(48)


class Outbox:
    """Bounded persistent queue: put() appends (dropping the oldest beyond max_items /
    max_bytes, counted in `dropped`), peek() returns the oldest, pop(seq) removes it."""

    def __init__(self, path, max_items=32, max_bytes=8192, max_msg=1024):
        self.path = path
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_msg = max_msg
        self.dropped = 0
        self.seq = 1
        self.count = 0
        self.size = 0
        self.errors = 0
        self._load()

    def __len__(self):
        return self.count

    # ---- public ----------------------------------------------------------------

    def put(self, topic, payload):
        """Append a message (topic: str relative to the server prefix). Returns its seq."""
        t = topic.encode() if isinstance(topic, str) else bytes(topic)
        p = payload.encode() if isinstance(payload, str) else bytes(payload)
        if b"\n" in t or not t:
            raise ValueError("bad outbox topic")
        if len(p) > self.max_msg:
            p = p[:self.max_msg]
        body = t + b"\n" + p
        seq = self.seq
        self.seq += 1
        # drop the oldest records so that the new one fits
        skip = 0
        n = self.count
        size = self.size
        if n + 1 > self.max_items or size + len(body) > self.max_bytes:
            for s, b in self._records():
                if n + 1 <= self.max_items and size + len(body) <= self.max_bytes:
                    break
                skip += 1
                n -= 1
                size -= len(b)
        self.dropped += skip
        self._rewrite(skip, (seq, body))
        return seq

    def peek(self):
        """(seq, topic str, payload bytes) of the oldest message, or None."""
        for s, b in self._records():
            k = b.find(b"\n")
            return s, b[:k].decode(), b[k + 1:]
        return None

    def pop(self, seq):
        """Remove the oldest message if its seq is `seq` (acknowledged). True if removed."""
        for s, b in self._records():
            if s != seq:
                return False
            self._rewrite(1, None)
            return True
        return False

    def clear(self):
        self._rewrite(self.count, None)

    # ---- file ------------------------------------------------------------------

    def _records(self):
        # yields (seq, body) of valid records in order; stops at the first bad one
        try:
            f = open(self.path, "rb")
        except OSError:
            return
        try:
            if not f.readline(_HDR_MAX).startswith(b"OBX1 "):
                return
            while True:
                h = f.readline(_HDR_MAX)
                if not h:
                    return
                r = _parse(h)
                if r is None:
                    return
                b = f.read(r[1] + 1)
                if len(b) != r[1] + 1 or b[-1] != 10 or crc32(b[:-1]) != r[2]:
                    return
                yield r[0], b[:-1]
        finally:
            f.close()

    def _rewrite(self, skip, new):
        self.count, self.size = fsutil.write(self.path, lambda o: self._copy(o, skip, new), "wb")

    def _copy(self, o, skip, new):
        n = 0
        size = 0
        o.write(b"OBX1 %d %d\n" % (self.dropped, self.seq))
        k = 0
        for s, b in self._records():
            k += 1
            if k <= skip:
                continue
            _write(o, s, b)
            n += 1
            size += len(b)
        if new is not None:
            _write(o, new[0], new[1])
            n += 1
            size += len(new[1])
        return n, size

    def _load(self):
        if not _exists(self.path) and _exists(self.path + ".tmp"):
            fsutil.replace(self.path + ".tmp", self.path)  # cut between remove and rename (FAT)
        try:
            f = open(self.path, "rb")
        except OSError:
            return
        n = size = 0
        bad = False
        with f:
            h = f.readline(_HDR_MAX)
            p = h.split()
            try:
                if len(p) != 3 or p[0] != b"OBX1" or h[-1] != 10:
                    raise ValueError
                self.dropped = int(p[1])
                self.seq = int(p[2])
            except ValueError:
                bad = True
            while not bad:
                h = f.readline(_HDR_MAX)
                if not h:
                    break
                r = _parse(h)
                b = f.read(r[1] + 1) if r else b""
                if not r or len(b) != r[1] + 1 or b[-1] != 10 or crc32(b[:-1]) != r[2]:
                    bad = True
                    break
                n += 1
                size += r[1]
                if r[0] >= self.seq:
                    self.seq = r[0] + 1
        self.count = n
        self.size = size
        if bad:
            # damaged header or record (e.g. power cut on a file system without atomic
            # rename): keep the good records before it, count the loss, rewrite the file
            self.errors += 1
            self.dropped += 1
            self._rewrite(0, None)


def _parse(h):
    p = h.split()
    if len(p) != 3 or h[-1] != 10:
        return None
    try:
        return int(p[0]), int(p[1]), int(p[2], 16)
    except ValueError:
        return None


def _write(o, seq, body):
    o.write(b"%d %d %08x\n" % (seq, len(body), crc32(body)))
    o.write(body)
    o.write(b"\n")


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False

