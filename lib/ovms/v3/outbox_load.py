"""Outbox start-up (loaded on demand, then dropped): reads and checks the log, converts OBX1."""
# OBX1, the earlier format (whole-file rewrites):
#   b"OBX1 <dropped> <next seq>\n", per record b"<seq> <length> <crc32 hex>\n" body b"\n"
import os
from binascii import crc32
from ovms import fsutil
from ovms.v3.outbox import _MAGIC, _mark, _parse, _rec


def load(self):
    """Read and check the log of Outbox self (count, size, head, seqs), cut a damaged tail,
    convert an OBX1 file."""
    if not _exists(self.path) and _exists(self.path + ".tmp"):
        fsutil.replace(self.path + ".tmp", self.path)  # cut between remove and rename (FAT)
    try:
        f = open(self.path, "rb")
    except OSError:
        return
    bad = False
    last = 0
    with f:
        m = f.read(5)
        off = len(m)
        if m == b"OBX1 ":
            off = -1
        bad = m != _MAGIC and off > 0
        if bad:
            off = 0
        while off > 0 and not bad:
            h = f.readline(48)
            if not h:
                break
            r = _parse(h)
            b = f.read(r[2] + 1) if r else b""
            if (not r or len(b) != r[2] + 1 or b[-1] != 10
                    or crc32(memoryview(b)[:-1], crc32(memoryview(h)[:h.rfind(b" ")])) != r[3]):
                bad = True
                break
            if r[0] == 77:
                if r[1] <= last:        # seqs of messages only grow
                    bad = True
                    break
                last = r[1]
            else:
                self.done = max(self.done, r[1])
                try:
                    self.dropped = max(self.dropped, int(b[:-1]))
                except ValueError:
                    pass
            off += len(h) + r[2] + 1
    if off < 0:
        # the earlier format (whole-file rewrites): converted once, after an upgrade
        import ovms
        try:
            fsutil.write(self.path, lambda o: _convert(self.path, o),
                         "wb")
        finally:
            ovms.unload("v3.outbox1")
        return load(self)
    self._end = off
    self.seq = max(self.seq, last + 1, self.done + 1)
    _recount(self)
    if bad:
        # damaged header or record (e.g. a power cut during an append): keep the good
        # records before it, count the loss, cut it off (rewrite)
        self.errors += 1
        self.dropped += 1
        self._compact()

def _recount(self):
    # count, size and head offset of the messages after `done`
    n = size = 0
    self._head = min(len(_MAGIC), self._end)
    head = self._end
    for s, k, at, nxt in self._msgs():
        if not n:
            head = at
        n += 1
        size += k
    self.count = n
    self.size = size
    self._head = head


def _convert(path, o):
    """Write the OBX1 queue at path as an outbox log into the open file o. Records up to the
    first damaged one are kept (as the OBX1 reader did)."""
    with open(path, "rb") as f:
        p = f.readline(48).split()
        try:
            dropped = int(p[1])
            seq = int(p[2])
        except (IndexError, ValueError):
            dropped, seq = 1, 1
        first = True
        while True:
            h = f.readline(48)
            r = h.split()
            try:
                s, n, c = int(r[0]), int(r[1]), int(r[2], 16)
            except (IndexError, ValueError):
                s = n = c = -1
            b = f.read(n + 1) if n >= 0 else b""
            ok = n >= 0 and len(b) == n + 1 and b[-1] == 10 and crc32(b[:-1]) == c
            if first:
                # every seq before the first kept message counts as consumed
                o.write(_MAGIC + _mark((s if ok else seq) - 1, dropped))
                first = False
            if not ok:
                return
            o.write(_rec(b"M", s, b[:-1]))
            o.write(b)


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
