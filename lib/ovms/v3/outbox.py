"""Persistent FIFO of outgoing messages on flash: append-only log, bounded, survives power cuts."""
# File layout (binary, one append-only log):
#   b"OBX2\n", then records  b"<kind> <seq> <length> <crc32 hex>\n" + body + b"\n"
#   kind M: a message,  body = topic + b"\n" + payload
#   kind P: every message with seq <= <seq> is consumed (popped or dropped), body = b"<dropped>"
# The CRC covers kind, seq, length and body: a torn append (power cut) or a damaged record ends
# the log on load; it and everything after it are dropped, counted and cut off (rewrite).
# put() and pop() append one record: no rewrite, no erase unless the log starts a new 4 KB
# sector. Past its bound the log is compacted in steps: each put/pop copies one chunk of the
# live part into <path>.tmp (at most one sector erase per call), which is renamed over <path>
# when it has caught up (atomic on LittleFS and POSIX; on FAT a leftover .tmp is recovered at
# start). An empty queue with a log past _RESET bytes starts a fresh log at once (a few bytes).
# Start-up (reading and checking the log) is in ovms.v3.outbox_load, loaded and dropped.
# Records are streamed one at a time: RAM use is one record.
from binascii import crc32
from micropython import const
from ovms import fsutil

_HDR_MAX = const(48)
_RESET = const(2048)        # an empty queue starts a fresh log past this size
_MAGIC = b"OBX2\n"


class Outbox:
    """Bounded persistent queue: put() appends (dropping the oldest beyond max_items /
    max_bytes, counted in `dropped`), peek() returns the oldest, pop(seq) removes it."""

    def __init__(self, path, max_items=32, max_bytes=8192, max_msg=1024):
        self.path = path
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_msg = max_msg
        self.dropped = 0
        self.seq = 1            # next seq
        self.done = 0           # every seq <= done is consumed
        self.count = 0
        self.size = 0
        self.errors = 0
        self._head = 0          # file offset of the first live message (or of the end)
        self._end = 0           # length of the valid log (0: no file)
        self._cap = max_bytes + 32 * max_items + 4096   # log size that starts a compaction
        self._cp = 0            # compaction in progress: log offset copied up to (0: none)
        self._base = 0          # log offset the compaction copies from
        self._plen = 0          # length of the compacted log's first part (magic, marker)
        import ovms
        try:
            ovms.load("v3.outbox_load").load(self)     # start-up code, not kept in RAM
        finally:
            ovms.unload("v3.outbox_load")

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
        n = self.count
        size = self.size
        mark = b""
        if n + 1 > self.max_items or size + len(body) > self.max_bytes:
            # drop the oldest records so that the new one fits: one P marker says so
            for s, k, at, nxt in self._msgs():
                if n + 1 <= self.max_items and size + len(body) <= self.max_bytes:
                    break
                n -= 1
                size -= k
                self.done = s
                self._head = nxt
            self.dropped += self.count - n
            mark = _mark(self.done, self.dropped)
        self.count = n + 1
        self.size = size + len(body)
        rec = _rec(b"M", seq, body)
        if self._end == 0 or self._end > 2 * self._cap:
            self._compact(rec, body)        # no log yet, or the steps fell behind
        else:
            # the message before the drop marker: a cut between them keeps one message more
            # than the bound (the next put drops it), never drops one for a message not kept
            self._append(rec, body, mark)
        return seq

    def peek(self):
        """(seq, topic str, payload bytes) of the oldest message, or None."""
        if not self.count:
            return None
        for s, k, at, nxt in self._msgs():
            with open(self.path, "rb") as f:
                f.seek(nxt - k - 1)
                b = f.read(k)
            i = b.find(b"\n")
            return s, b[:i].decode(), b[i + 1:]
        return None

    def pop(self, seq):
        """Remove the oldest message if its seq is `seq` (acknowledged). True if removed."""
        if not self.count:
            return False
        for s, k, at, nxt in self._msgs():
            if s != seq:
                return False
            self.count -= 1
            self.size -= k
            self.done = s
            self._head = nxt
            if self.count == 0 and (self._end > _RESET or self._cp):
                self._compact()
            else:
                self._append(_mark(s, self.dropped))
            return True
        return False

    def clear(self):
        self.done = self.seq - 1
        self.count = self.size = 0
        self._head = self._end
        self._compact()

    # ---- file ------------------------------------------------------------------

    def _msgs(self):
        # yields (seq, body length, record offset, offset after it) of the live messages
        try:
            f = open(self.path, "rb")
        except OSError:
            return
        try:
            off = self._head
            while off < self._end:
                f.seek(off)
                h = f.readline(_HDR_MAX)
                r = _parse(h)
                if r is None:
                    return
                at = off
                off += len(h) + r[2] + 1
                if r[0] == 77 and r[1] > self.done:        # b"M"
                    yield r[1], r[2], at, off
        finally:
            f.close()

    def _append(self, rec, body=None, mark=b""):
        e = self._end
        try:
            with open(self.path, "ab") as f:
                f.write(rec)
                if body is not None:
                    f.write(body)
                    f.write(b"\n")
                f.write(mark)
        except OSError:
            # flash full or failing: whatever part was written must not stay in the log
            try:
                self._compact()
            except OSError:
                pass
            raise
        n = len(rec) + len(mark) + (0 if body is None else len(body) + 1)
        self._end = e + n
        if (self._cp or self._end > self._cap) and e & 4095 and e >> 12 == (e + n - 1) >> 12:
            # one compaction step, unless this append already started a flash sector (an
            # erase): copy at least twice what was appended, so the copy catches up
            self._step(max(1024, 2 * n))

    def _step(self, n):
        # one step of a compaction: the live part of the log is copied into <path>.tmp over
        # several put/pop calls (each at most one sector erase), then renamed over <path>.
        # A cut before the rename leaves the log as it was; the .tmp is written anew.
        tmp = self.path + ".tmp"
        if not self._cp:
            m = _MAGIC + _mark(self.done, self.dropped)
            with open(tmp, "wb") as o:
                o.write(m)
            self._plen = len(m)
            self._base = self._cp = self._head
            return
        with open(tmp, "ab") as o:
            self._cp = _copy(self.path, self._cp, min(self._end, self._cp + n), o)
        if self._cp >= self._end:
            fsutil.replace(tmp, self.path)
            d = self._plen - self._base
            self._head += d
            self._end += d
            self._cp = 0

    def _compact(self, rec=None, body=None):
        # rewrite: a P marker with the state, the live records, then the new record (if any)
        self._cp = 0
        self._end = fsutil.write(self.path, lambda o: self._all(o, rec, body), "wb")

    def _all(self, o, rec, body):
        m = _MAGIC + _mark(self.done, self.dropped)
        o.write(m)
        n = len(m) + self._end - self._head
        _copy(self.path, self._head, self._end, o)
        self._head = len(m)
        if rec is not None:
            o.write(rec)
            o.write(body)
            o.write(b"\n")
            n += len(rec) + len(body) + 1
        return n

def _rec(kind, seq, body):
    # the header line of a record (the body and b"\n" follow it)
    h = kind + b" %d %d" % (seq, len(body))
    return h + b" %08x\n" % crc32(body, crc32(h))


def _copy(path, a, e, o):
    # copies bytes a..e of the file at path to the open file o; returns where it stopped
    if a < e:
        buf = bytearray(256)
        with open(path, "rb") as f:
            f.seek(a)
            while a < e:
                k = f.readinto(buf)
                if not k:
                    break
                k = min(k, e - a)
                o.write(buf if k == 256 else memoryview(buf)[:k])
                a += k
    return a


def _mark(done, dropped):
    # the whole P record: messages up to `done` are consumed, `dropped` so far
    d = b"%d" % dropped
    return _rec(b"P", done, d) + d + b"\n"


def _parse(h):
    # b"M 12 34 0badf00d\n" -> (kind byte, seq, length, crc) or None
    p = h.split()
    if len(p) != 4 or h[-1] != 10 or len(p[0]) != 1 or p[0][0] not in b"MP":
        return None
    try:
        return p[0][0], int(p[1]), int(p[2]), int(p[3], 16)
    except ValueError:
        return None
