"""Shell commands: can status, can send <id> <hex> [bus]; frame sending for vehicle commands."""
from ovms import shell


def frame(f):
    """Check one (bus, id, ext, data) frame from a vehicle definition; returns it with
    data as bytes, raises ValueError if malformed."""
    if not isinstance(f, (tuple, list)) or len(f) != 4:
        raise ValueError("frame must be (bus, id, ext, data)")
    bus, fid, ext, data = f
    if not isinstance(bus, int) or not 1 <= bus <= 4:
        raise ValueError("bad bus %r" % (bus,))
    if not isinstance(fid, int) or fid < 0 or fid > (0x1FFFFFFF if ext else 0x7FF):
        raise ValueError("bad CAN id %r" % (fid,))
    if isinstance(data, (list, tuple)):
        data = bytes(data)
    if not isinstance(data, (bytes, bytearray)) or len(data) > 8:
        raise ValueError("bad frame data")
    return bus, fid, bool(ext), bytes(data)


def _bus(hook, attr):
    # the app's hook, else ovms.can.bus.<attr> when the app runs buses, else None
    h = shell.hooks.get(hook)
    if h is None:
        import sys
        cb = sys.modules.get("ovms.can.bus")     # never imported from here: no heap cost
        if cb is not None and cb.buses():
            h = getattr(cb, attr, None)
    return h


def send(bus, fid, ext, data):
    """Send one frame through the can_send hook; returns None or an error text."""
    h = _bus("can_send", "send")
    if h is None:
        return "CAN bus not available"
    try:
        if h(bus, fid, ext, data) is False:
            return "CAN transmit failed (queue full or bus listen-only)"
    except Exception as e:
        return "CAN transmit failed (%s)" % (e,)
    return None


def _status(session, args):
    h = _bus("can_status", "status")
    if h is None:
        return "Error: CAN bus not available"
    r = h()
    if isinstance(r, str):
        return r
    if isinstance(r, dict):
        k = list(r)
        k.sort()
        r = [(x, r[x]) for x in k]
    o = shell.Out(session)
    for x in r:
        if not o.add("%-20s %s" % (x[0], x[1])):
            break
    return o.text()


def _hexid(s):
    t = s[2:] if s[:2] in ("0x", "0X") else s
    if not t or len(t) > 8:
        raise ValueError
    for c in t:
        if c not in "0123456789abcdefABCDEF":
            raise ValueError
    return int(t, 16), len(t) > 3


def _send(session, args):
    try:
        fid, ext = _hexid(args[0])
    except ValueError:
        return "Error: Invalid CAN id (hex, up to 7FF standard or 1FFFFFFF extended)"
    ext = ext or fid > 0x7FF
    if fid > 0x1FFFFFFF:
        return "Error: Invalid CAN id (hex, up to 7FF standard or 1FFFFFFF extended)"
    h = args[1]
    for c in ":.-":
        h = h.replace(c, "")
    if h[:2] in ("0x", "0X"):
        h = h[2:]
    try:
        data = bytes.fromhex(h)
    except ValueError:
        data = None
    if data is None or len(data) > 8:
        return "Error: Invalid data (0 to 8 bytes as hex, e.g. 02010d)"
    bus = 1
    if len(args) > 2:
        try:
            bus = int(args[2])
        except ValueError:
            bus = 0
        if not 1 <= bus <= 4:
            return "Error: Invalid bus (1..4)"
    e = send(bus, fid, ext, data)
    if e:
        return "Error: " + e
    return "Frame sent: bus %d id %s%x data %s" % (bus, "ext " if ext else "", fid,
                                                   " ".join("%02x" % b for b in data) or "(none)")


shell.register("can", "CAN bus framework", None)
shell.register("can status", "Bus state and counters", _status, "", 0, 0, False)
shell.register("can send", "Transmit one frame", _send, "<id> <hexdata> [<bus>]", 2, 3, True)
