"""Outbox upgrade: the earlier queue file format (OBX1) converted to the log, loaded on demand."""
# OBX1: b"OBX1 <dropped> <next seq>\n", per record b"<seq> <length> <crc32 hex>\n" body b"\n"
from binascii import crc32
from ovms.v3.outbox import _MAGIC, _mark, _rec


def convert(path, o):
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
