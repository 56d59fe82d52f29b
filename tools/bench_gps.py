#!/usr/bin/env python3
"""GPS data usage and reader heap: MQTT bytes per hour for a parked and a driving car.

    bench_gps.py [--minutes 60]

On the micropython binary with the device's own code: NMEA sentences (GGA + RMC once a
second, as a 1-Hz receiver sends them) go through ovms.gps (parser, deadband, metrics) and
the server's scheduler (ovms.v3.sched.Scheduler, default policies) on a simulated clock;
bytes count as bench_mqtt.py counts them (MQTT PUBLISH of each due metric). Parked: the fix
wanders +-3 m around one spot (receiver noise), speed 0-0.2 km/h. Driving: 50 km/h north,
heading 0, the car on. Also the reader's heap: the parser and the task's state, and what
10,000 sentences leave behind."""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.join(os.path.dirname(HERE), "lib")

SIM = r'''
import sys, gc, math, time
sys.path[:0] = [%(lib)r]
from ovms import metrics, config
T = [time.ticks_ms()]
metrics._ms = lambda: T[0] & 0x3FFFFFFF
metrics._up_last = metrics._ms()
config.init(%(store)r)
from ovms.v3.sched import Scheduler
from ovms import gps
from ovms.gps import nmea
gc.collect()
h0 = gc.mem_alloc()
p = nmea.Parser()
gps._p = p
gc.collect()
heap = gc.mem_alloc() - h0
def cs(b):
    x = 0
    for c in b:
        x ^= c
    return b"$" + b + b"*%%02X\r\n" %% x
def dm(v, w):
    d = int(abs(v))
    return ("%%0*d%%08.5f" %% (w, d, (abs(v) - d) * 60)).encode()
def cycle(t, lat, lon, kn, trk):
    hh, mm, ss = t // 3600 %% 24, t // 60 %% 60, t %% 60
    tm = b"%%02d%%02d%%02d.00" %% (hh, mm, ss)
    g = cs(b"GPGGA," + tm + b"," + dm(lat, 2) + b",N," + dm(lon, 3) + b",E,1,09,0.9,12.5,M,47.0,M,,")
    r = cs(b"GPRMC," + tm + b",A," + dm(lat, 2) + b",N," + dm(lon, 3) + b",E,%%.2f,%%.1f,041226,,,A" %% (kn, trk))
    return g + r
def size(t, pl):
    n = 2 + len(t) + len(pl)
    return 1 + (1 if n < 128 else 2) + n
PFX = "ovms/demo/DEMO1/"
def run(mode, minutes):
    s = Scheduler((5, 10, 10, 60, 600))
    metrics.set("v.e.on", mode == "drive")
    metrics.set("v.e.awake", mode == "drive")
    gps._st.clear()
    byts = 0
    pubs = 0
    lat, lon = 52.0, 4.0
    seed = 1
    s.all()
    for k in range(minutes * 60):
        T[0] += 1000
        if mode == "drive":
            lat += 50 / 3.6 / 111195.0
            kn, trk = 50 / 1.852, 0.0
            la, lo = lat, lon
        else:
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            la = lat + ((seed %% 600) - 300) / 1e7       # +-3.3 m
            lo = lon + (((seed >> 10) %% 600) - 300) / 1e7
            kn, trk = (seed %% 11) / 100, (seed %% 360) * 1.0
        p.feed(cycle(43200 + k, la, lo, kn, trk), lambda kind: gps.update(p, T[0]))
        s.collect()
        for i in s.due(metrics.uptime()):
            if metrics.name(i)[:4] == "v.p.":
                byts += size(PFX + "metric/" + metrics.name(i).replace(".", "/"), metrics.text(i))
                pubs += 1
            s.sent(i, metrics.uptime())
    return byts * 60 // minutes, pubs * 60 // minutes
park = run("park", %(minutes)d)
drive = run("drive", %(minutes)d)
gc.collect()
a = gc.mem_alloc()
for k in range(10000):
    p.feed(cycle(k, 52.0, 4.0, 0.0, 0.0))
gc.collect()
print("RESULT", park[0], park[1], drive[0], drive[1], heap, gc.mem_alloc() - a, p.good, p.bad)
'''


def run(minutes=60):
    d = tempfile.mkdtemp(prefix="bench-gps-")
    script = os.path.join(d, "sim.py")
    with open(script, "w") as f:
        f.write(SIM % {"lib": LIB, "store": os.path.join(d, "store"), "minutes": minutes})
    mp = os.path.join(os.path.dirname(sys.executable), "micropython")
    r = subprocess.run([mp if os.path.exists(mp) else "micropython", "-X", "heapsize=2M", script],
                       capture_output=True, text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    w = [int(x) for x in line[0].split()[1:]]
    return {"parked_bytes_per_hour": w[0], "parked_publishes_per_hour": w[1],
            "driving_bytes_per_hour": w[2], "driving_publishes_per_hour": w[3],
            "parser_heap_bytes": w[4], "heap_left_after_10000_sentences": w[5],
            "sentences_good": w[6], "sentences_bad": w[7], "note": "host bytes (64-bit)"}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=int, default=60)
    r = run(ap.parse_args().minutes)
    print("GPS: parked %(parked_bytes_per_hour)d B/h (%(parked_publishes_per_hour)d publishes), "
          "driving %(driving_bytes_per_hour)d B/h (%(driving_publishes_per_hour)d); parser heap "
          "%(parser_heap_bytes)d B, %(heap_left_after_10000_sentences)d B left after 10,000 sentences" % r)
    print(json.dumps(r))
