"""Signed MQTT commands: HMAC-SHA256 with the module password, counters against replay."""
# A signed command's payload is one header line, then the command text:
#   "!sig1 <counter> <mac>\n<command>"
# counter: decimal 1..2**62, larger than any counter this client id used before (tools/ovms.py
# uses the time in ms); mac: 64 lowercase hex digits of
#   HMAC-SHA256(key = module password (UTF-8),
#               msg = "ovms-cmd1\n" + client id + "\n" + command id + "\n" + counter + "\n" + command)
# (client id and command id as in the topic client/<cid>/command/<id>, all UTF-8 bytes).
# The highest counter of the last _N client ids is kept on flash (<config root>/v3cmd.ctr,
# written once per accepted command: secure commands are rare), so a recorded command never
# runs again, also after a reboot; a client id dropped from the table raises a floor that
# every later counter must pass.
from hashlib import sha256
from micropython import const

HDR = b"!sig1 "
_N = const(16)
_MAX = const(1 << 62)
_tab = None         # {cid bytes: counter}, loaded on first use
_floor = 0


def mac(key, msg):
    """HMAC-SHA256 (RFC 2104) of msg under key (bytes)."""
    if len(key) > 64:
        key = sha256(key).digest()
    k = bytearray(64)
    k[:len(key)] = key
    for i in range(64):
        k[i] ^= 0x36
    h = sha256(k)
    h.update(msg)
    d = h.digest()
    for i in range(64):
        k[i] ^= 0x36 ^ 0x5C
    h = sha256(k)
    h.update(d)
    return h.digest()


def _path():
    from ovms import config
    return (config.root().rstrip("/") or "") + "/v3cmd.ctr"


def _load():
    global _tab, _floor
    _tab = {}
    try:
        with open(_path(), "rb") as f:
            for ln in f:
                n, _, c = ln.rstrip(b"\n").partition(b" ")
                if c == b"":
                    _floor = max(_floor, int(n))
                else:
                    _tab[c] = int(n)
    except (OSError, ValueError):
        pass


def _save():
    p = _path()
    with open(p + ".tmp", "wb") as f:
        f.write(b"%d\n" % _floor)
        for c in _tab:
            f.write(b"%d %s\n" % (_tab[c], c))
    import os
    os.rename(p + ".tmp", p)


def check(cid, cmd_id, msg, pw):
    """(command bytes, None) if msg carries a valid fresh signature under the module password
    pw, else (None, error text). cid, cmd_id, msg: bytes."""
    global _floor
    if _tab is None:
        _load()
    e = msg.find(b"\n")
    h = msg[len(HDR):e].split(b" ") if e > 0 else ()
    if len(h) != 2 or len(h[1]) != 64 or not h[0].isdigit() or len(h[0]) > 19:
        return None, "Error: Malformed signature line (!sig1 <counter> <hmac>)"
    if not pw:
        return None, "Error: No module password set (password module): cannot check signatures"
    cmd = msg[e + 1:]
    m = mac(pw.encode(), b"ovms-cmd1\n%s\n%s\n%s\n%s" % (cid, cmd_id, h[0], cmd))
    try:
        got = bytes.fromhex(h[1])
    except ValueError:
        got = b""
    r = len(got) ^ 32
    for i in range(min(32, len(got))):
        r |= m[i] ^ got[i]
    if r:
        return None, "Error: Bad command signature"
    n = int(h[0])
    if n <= max(_floor, _tab.get(cid, 0)) or n >= _MAX:
        return None, "Error: Replayed or old command (counter %d not newer)" % n
    if cid not in _tab and len(_tab) >= _N:
        old = min(_tab, key=_tab.get)
        _floor = max(_floor, _tab.pop(old))
    _tab[cid] = n
    try:
        _save()
    except OSError as x:
        return None, "Error: Could not save the command counter (%r)" % (x,)
    return cmd, None
