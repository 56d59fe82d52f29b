"""GPS task: NMEA from a UART into OVMS position metrics, places (geofences), flatbed alert."""
import asyncio
import math
import time
from micropython import const
from ovms import config, events, metrics

_SILENT_MS = const(5000)    # no valid sentence this long: no lock (the values go stale)
_EARTH_M = 6371000.0

_p = None       # the parser (ovms.gps.nmea.Parser) while the task runs
_st = {}        # pos: published (lat, lon); place: current place name; park: parked
                # position; moved: flatbed alert sent; last: ms of the last valid sentence


def parser():
    return _p


def distance(lat1, lon1, lat2, lon2):
    """Metres between two positions (equirectangular: exact enough below a few km)."""
    x = math.radians(lon2 - lon1) * math.cos(math.radians((lat1 + lat2) / 2))
    y = math.radians(lat2 - lat1)
    return _EARTH_M * math.sqrt(x * x + y * y)


def places():
    """{name: (lat, lon, radius m)} from config "location" (`location add`)."""
    out = {}
    for name in config.instances("location"):
        try:
            a, b, r = config.get("location", name).split(",")
            out[name] = (float(a), float(b), float(r))
        except (ValueError, AttributeError):
            pass            # a damaged entry is skipped (location list shows it)
    return out


def _place(lat, lon):
    best = None
    bd = 0
    for name, (a, b, r) in places().items():
        d = distance(lat, lon, a, b)
        if d <= r and (best is None or d < bd):
            best, bd = name, d
    return best


def _sq(p):
    # OVMS: signal quality from the satellites used (6 = 50 %), 0 without a fix
    if not p.quality and not p.status:
        return 0
    return min(100, max(0, p.sats - 1) * 10)


def update(p, now_ms=None):
    """Metrics from the parser's fix (called after each valid sentence)."""
    from ovms.gps import nmea
    st = _st
    st["last"] = time.ticks_ms() if now_ms is None else now_ms
    lock = bool((p.status or p.quality) and p.have & 3 == 3)
    metrics.set("v.p.gpslock", lock)
    metrics.set("v.p.gpsmode", chr(p.faa) if lock else "N")
    metrics.set("v.p.satcount", p.sats)
    metrics.set("v.p.gpssq", _sq(p))
    if p.have & (1 << nmea.F_HDOP):
        metrics.set("v.p.gpshdop", p.fix[nmea.F_HDOP])
    if not lock:
        return
    f = p.fix
    if p.have & (1 << nmea.F_ALT):
        metrics.set("v.p.altitude", f[nmea.F_ALT])
    sp = f[nmea.F_SPEED] if p.have & (1 << nmea.F_SPEED) else -1.0
    if sp >= 0:     # below 1 km/h a receiver reports noise: standing still
        metrics.set("v.p.gpsspeed", sp if sp >= 1 else 0.0)
    if p.have & (1 << nmea.F_TRACK) and sp >= 2:    # a heading only while moving
        metrics.set("v.p.direction", f[nmea.F_TRACK])
    t = p.unix_time()
    if t > 0:
        metrics.set("v.p.gpstime", t)
        _clock(t)
    lat, lon = f[nmea.F_LAT], f[nmea.F_LON]
    pos = st.get("pos")
    db = config.get("gps", "deadband")
    if pos is None or distance(pos[0], pos[1], lat, lon) >= db:
        pos = st["pos"] = (lat, lon)
        _moved(lat, lon)
    # the published position again: fresh (age 0) while the fix lasts, no change, no data
    metrics.set("v.p.latitude", pos[0])
    metrics.set("v.p.longitude", pos[1])


def _moved(lat, lon):
    st = _st
    name = _place(lat, lon)
    old = st.get("place")
    if name != old:
        if old:
            events.raise_event("location.leave." + old)
        if name:
            events.raise_event("location.enter." + name)
        st["place"] = name
    metrics.set("v.p.location", name or "")
    # flatbed: moved while parked and switched off
    if metrics.get("v.e.on"):
        st["park"] = None
        st["moved"] = False
        return
    park = st.get("park")
    if park is None:
        st["park"] = (lat, lon)
        return
    lim = config.get("gps", "flatbed")
    d = distance(park[0], park[1], lat, lon)
    if lim and d > lim and not st.get("moved"):
        st["moved"] = True
        events.raise_event("location.alert.flatbed.moved")
        try:
            from ovms.v3 import server
            server.notify("alert", "flatbed.moved",
                          "Vehicle moved %d m while parked (now %.6f,%.6f)" % (d, lat, lon))
        except Exception as e:
            print("gps: flatbed alert:", repr(e))


def _clock(t):
    # a fix sets the clock when SNTP has not
    from ovms import net
    if not net.synced and abs(time.time() + net._EPOCH - t) > 2:
        try:
            net.set_clock(t)
        except Exception as e:      # no RTC (a board without one): the fix still counts
            print("gps: clock not set:", repr(e))


def _silent(now_ms):
    last = _st.get("last")
    if last is not None and time.ticks_diff(now_ms, last) > _SILENT_MS:
        _st["last"] = None
        metrics.set("v.p.gpslock", False)
        metrics.set("v.p.gpsmode", "N")
        metrics.set("v.p.gpssq", 0)


async def run(uart=None):
    """Task: read the receiver (machine.UART from config: gps uart, rx, tx, baud)."""
    global _p
    from ovms.gps import nmea
    if uart is None:
        import machine
        kw = {"baudrate": config.get("gps", "baud"), "rx": config.get("gps", "rx"),
              "rxbuf": 512, "timeout": 0}
        if config.get("gps", "tx") >= 0:
            kw["tx"] = config.get("gps", "tx")
        try:
            uart = machine.UART(config.get("gps", "uart"), **kw)
        except Exception as e:      # bad pins or UART: say so, keep the task (no reset)
            print("gps: cannot open UART %d: %r" % (config.get("gps", "uart"), e))
            while True:
                await asyncio.sleep(3600)
    p = _p = nmea.Parser()
    buf = bytearray(128)
    mv = memoryview(buf)
    _st.clear()
    _st["last"] = time.ticks_ms()

    def cb(kind):
        update(p)
    while True:
        n = uart.any()
        while n > 0:
            k = uart.readinto(mv[:min(n, 128)]) or 0
            if k <= 0:
                break
            p.feed(mv[:k], cb)
            n -= k
        _silent(time.ticks_ms())
        await asyncio.sleep_ms(100)
