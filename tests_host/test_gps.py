"""GPS task (ovms.gps) on the micropython binary: metrics with OVMS names, distance deadband
(a parked car publishes nothing), places with enter/leave events, the flatbed alert, a
silent receiver; and on the virtual device: a recorded NMEA log on the board's UART
(`vdev.py run --gps-log`) arriving as position metrics on MQTT."""
import functools
import os
import subprocess
import sys

from util import LIB, REPO, TOOLS, VDev, run_mpy

NEO = os.path.join(REPO, "tests_host", "data", "gps", "neo-m8n.log")


def nmea(body):
    x = functools.reduce(lambda a, c: a ^ ord(c), body, 0)
    return "$%s*%02X\r\n" % (body, x)


def rmc(lat, lon, t="120000.00", knots="0.0", status="A"):
    def dm(v, w):
        d = int(abs(v))
        return "%0*d%08.5f" % (w, d, (abs(v) - d) * 60)
    return nmea("GPRMC,%s,%s,%s,%s,%s,%s,%s,90.0,041226,,,A" % (
        t, status, dm(lat, 2), "N" if lat >= 0 else "S", dm(lon, 3), "E" if lon >= 0 else "W", knots))


def gga(lat, lon, t="120000.00", q=1, sats=8):
    def dm(v, w):
        d = int(abs(v))
        return "%0*d%08.5f" % (w, d, (abs(v) - d) * 60)
    return nmea("GPGGA,%s,%s,%s,%s,%s,%d,%02d,0.9,12.5,M,47.0,M,," % (
        t, dm(lat, 2), "N" if lat >= 0 else "S", dm(lon, 3), "E" if lon >= 0 else "W", q, sats))


DEV = """
import asyncio, time
from ovms import config, metrics, events, gps
config.init(%(store)r)
config.set("gps", "deadband", 10)
config.set("gps", "flatbed", 300)
config.set("location", "home", "52.000000,4.000000,150")
seen = []
events.raise_event = lambda name: seen.append(name)
import ovms.v3.server as srv
notes = []
srv.notify = lambda t, s, text: notes.append((t, s, text))
class U:
    def __init__(self):
        self.q = bytearray()
    def any(self):
        return len(self.q)
    def readinto(self, b):
        n = min(len(b), len(self.q))
        b[:n] = self.q[:n]
        self.q = self.q[n:]
        return n
u = U()
def pos():
    return metrics.get("v.p.latitude"), metrics.get("v.p.longitude")
async def main():
    asyncio.create_task(gps.run(u))
    metrics.set("v.e.on", True)
%(body)s
asyncio.run(main())
"""


def run(tmp_path, body):
    code = DEV % {"store": str(tmp_path / "store"), "body": "\n".join("    " + ln for ln in body.strip().splitlines())}
    return run_mpy(code, heap="512K", path=(LIB,)).stdout


def feed(*sentences):
    return "u.q += %r\nawait asyncio.sleep_ms(250)" % "".join(sentences).encode()


def test_position_metrics_places_and_deadband(tmp_path):
    out = run(tmp_path, "\n".join([
        feed(gga(51.99, 4.0), rmc(51.99, 4.0, knots="10.0")),
        'print("A", pos(), metrics.get("v.p.gpslock"), metrics.get("v.p.satcount"), metrics.get("v.p.gpssq"), metrics.get("v.p.location"))',
        'print("T", metrics.get("v.p.gpstime"), metrics.text("v.p.gpsspeed"), metrics.get("v.p.altitude"), metrics.get("v.p.gpsmode"))',
        feed(gga(51.99003, 4.0), rmc(51.99003, 4.0)),       # 3 m: inside the deadband
        'print("B", pos())',
        feed(gga(52.0, 4.0005), rmc(52.0, 4.0005)),         # into "home"
        'print("C", pos(), metrics.get("v.p.location"), seen)',
        feed(gga(52.01, 4.0), rmc(52.01, 4.0)),             # out again
        'print("D", metrics.get("v.p.location") == "", seen)',
    ]))
    lines = {ln[0]: ln for ln in out.splitlines() if ln[:1] in "ABCDT"}
    assert "(51.99, 4.0) True 8 70 " in lines["A"], out
    assert "T 1796385600 18.52 12.5 A" in lines["T"], out     # 2026-12-04 12:00:00 UTC
    assert "(51.99, 4.0)" in lines["B"], out                  # 3 m: not published
    assert "(52.0, 4.0005) home ['location.enter.home']" in lines["C"], out
    assert "True ['location.enter.home', 'location.leave.home']" in lines["D"], out


def test_flatbed_alert_when_moved_while_parked(tmp_path):
    out = run(tmp_path, "\n".join([
        'metrics.set("v.e.on", False)',
        feed(gga(52.1, 4.1), rmc(52.1, 4.1)),
        feed(gga(52.1015, 4.1), rmc(52.1015, 4.1)),     # 167 m: below 300
        'print("N1", len(notes))',
        feed(gga(52.104, 4.1), rmc(52.104, 4.1)),       # 445 m from where it parked
        feed(gga(52.106, 4.1), rmc(52.106, 4.1)),       # once only
        'print("N2", notes, seen)',
    ]))
    assert "N1 0" in out, out
    n2 = [ln for ln in out.splitlines() if ln.startswith("N2")][0]
    assert n2.count("flatbed.moved") == 2 and "'alert'" in n2 and "moved 44" in n2, out  # notify + event


def test_silent_receiver_loses_the_lock_and_garbage_is_counted(tmp_path):
    out = run(tmp_path, "\n".join([
        feed(gga(52.1, 4.1), rmc(52.1, 4.1), "$GPRMC,garbage*00\\r\\n", "\\x00\\xff$$$\\r\\n"),
        'print("L1", metrics.get("v.p.gpslock"), gps.parser().bad >= 2)',
        "await asyncio.sleep_ms(5500)",
        'print("L2", metrics.get("v.p.gpslock"), metrics.get("v.p.gpsmode"))',
    ]))
    assert "L1 True True" in out and "L2 False N" in out, out


def test_gps_log_on_the_virtual_device_reaches_mqtt(tmp_path, broker):
    from mqttpeer import Client
    root = tmp_path / "flash"
    with VDev(root, extra=("--gps-log", NEO)) as d:
        def ovms(*a):
            r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", d.pty, *a],
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout
        ovms("config", "set", "gps", "enabled", "yes")
        ovms("config", "set", "location", "trailhead", "44.069000,-121.314200,100")
        ovms("provision", "--wifi", "car", "wifipw", "--mqtt-host", "localhost", "--mqtt-port",
             str(broker.tls_port), "--ca", broker.ca, "--id", "GPS1")
        c = Client(broker, "ovms//GPS1/")
        try:
            lat = float(c.wait("metric/v/p/latitude", timeout=60))
            lon = float(c.wait("metric/v/p/longitude", timeout=10))
            assert abs(lat - 44.069010) < 1e-4 and abs(lon + 121.314246) < 1e-4, (lat, lon)
            assert c.wait("metric/v/p/location", timeout=10) == "trailhead"
            assert "yes" in c.command("metrics get v.p.gpslock")
            st = c.command("gps status")
            assert "lock" in st and "Sentences:" in st, st
            assert "trailhead" in c.command("location list")
            assert "added" in c.command("location add shop 44.1 -121.3 200")
            assert "Error" in c.command("location add bad 95 0")
            assert "removed" in c.command("location remove shop")
        finally:
            c.close()


def test_a_parked_car_costs_almost_no_data():
    """Receiver noise around a parked car publishes (almost) nothing; driving publishes the
    position at the scheduler's on-interval (tools/bench_gps.py)."""
    import bench_gps
    r = bench_gps.run(minutes=20)
    print(r)
    assert r["parked_bytes_per_hour"] < 2000, r
    assert r["driving_bytes_per_hour"] > 20 * r["parked_bytes_per_hour"], r
    assert r["heap_left_after_10000_sentences"] < 1024, r
