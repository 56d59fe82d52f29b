"""Shell commands: obd request <tx> <rx> <hex> [bus] (one-off ISO-TP request), obd status."""
import sys
from ovms import shell


def _poller():
    m = sys.modules.get("ovms.poll.poller")
    p = m.current() if m else None
    if p is not None:
        return p, None
    cb = sys.modules.get("ovms.can.bus")
    bs = [b for b in cb.buses() if not b.listen_only] if cb else []
    if not bs:
        return None, ("Error: no CAN bus in normal mode (config set vehicle can.mode normal, "
                      "or config set vehicle poll obd)")
    from ovms.poll import poller
    return poller.adhoc(bs), None


def _hexid(t):
    v = int(t, 16)
    if not 0 <= v <= 0x1FFFFFFF:
        raise ValueError
    return v


async def _ask(p, bus, tx, rx, ext, req):
    ok, r = await p.request(bus, tx, rx, ext, req)
    if not ok:
        return "Error: %s" % r
    if len(r) >= 3 and r[0] == 0x7F:
        return "Error: negative response %02x (service %02x)\n%s" % (r[2], r[1], r.hex())
    return r.hex()


def _request(session, args):
    try:
        tx, rx = _hexid(args[0]), (_hexid(args[1]) if args[1] not in ("-", "0") else 0)
        req = bytes.fromhex(args[2])
        bus = int(args[3][3:] if args[3].startswith("can") else args[3]) if len(args) > 3 else 0
    except ValueError:
        return "Error: usage: obd request <txid hex> <rxid hex|-> <request hex> [can0|can1]"
    if not 0 < len(req) <= 64:
        return "Error: request must be 1..64 bytes"
    ext = tx > 0x7FF or rx > 0x7FF or len(args[0]) > 3
    p, err = _poller()
    if err:
        return err
    return _ask(p, bus, tx, rx, ext, req)


def _status(session, args):
    m = sys.modules.get("ovms.poll.poller")
    p = m.current() if m else None
    if p is None:
        return ("Poller not running (config set vehicle poll obd, or a vehicle with a poll list;"
                " then module reset: read at start)")
    o = shell.Out(session)
    for ln in p.status():
        if not o.add(ln):
            break
    return o.text()


shell.register("obd", "OBD-II/UDS diagnostic requests", None)
shell.register("obd request", "Send one request and show the answer (hex) or the error",
               _request, "<txid> <rxid|-> <hex> [can0|can1]", 3, 4, True)
shell.register("obd status", "Poller state and counts per polled ECU", _status, "", 0, 0, False)
