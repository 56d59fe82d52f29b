#!/usr/bin/env python3
"""Benchmarks of device code on the micropython binary (one JSON object per run on stdout).

Usage:
  bench.py decode --dbc FILE.dbc --log FILE.log [--bus NAME] [--seconds S]
      {"frames": N, "viper_fps": .., "python_fps": .., "cantools_fps": .., "peak_heap_bytes": ..}
      N = frames of the log (on --bus) whose id the DBC defines; the same frames go through
      the viper decoder (Decoder.feed_batch, every DBC signal decoded and bound to a metric
      slot), the same decoder source without @micropython.viper (ptr8/16/32 = identity),
      and cantools' decode_message(id, data, allow_truncated=True) on CPython.
      peak_heap_bytes: GC heap held by the table (read from a file) + Decoder + the bound
      mod/tupd/targets arrays (gc.mem_alloc() deltas after gc.collect(); the module's code
      is not counted: it is frozen on a device).
  bench.py soak [--soak-seconds 600]
      tests_host/test_soak.py for that long: {"seconds", "passed", "summary"}
  bench.py poll [--poll-seconds 30]
      the diagnostic poller on the virtual device (tools/bench_poll.py): answers/s for a
      60-request list against a can-isotp ECU, poller heap, growth, worst loop stall.
  bench.py reconnect [--reconnects 5]
      CAN RX ring overruns in a steady window and per MQTT reconnect on the virtual device
      (tools/bench_reconnect.py), with the stock driver's 16 slots and the board's ring.
  bench.py all
      decode on the shipped logs (Kona 230112-7 can0/pcan.dbc, RAV4 can0 and can1) plus
      ratios viper/cantools and viper/python, table size and the heap the Decoder needs
      when the table is frozen (state_heap_bytes).

Add a benchmark: write `def bench_NAME(args) -> dict` and register it in COMMANDS.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LIB = os.path.join(REPO, "lib")
# the CAN corpus: OVMS_DATA (the full corpus) if set, else the copies in the repository
DATA = os.environ.get("OVMS_DATA")
IN_REPO = {"kona_ev/dbc/pcan.dbc": "firmware/vehicles/kn/pcan.dbc",
           "kona_ev/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log":
               "firmware/vehicles/kn/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz",
           "toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc":
               "firmware/vehicles/rv/toyota_new_mc_pt_generated.dbc",
           "toyota_rav4_comma2k19/dbc/toyota_adas.dbc": "tests_host/data/toyota_rav4_comma2k19/dbc/toyota_adas.dbc",
           "toyota_rav4_comma2k19/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log":
               "firmware/vehicles/rv/logs/comma2k19_rav4_seg40.log.gz"}


def corpus(rel):
    """Path of a corpus file: under OVMS_DATA when set, else the repository's copy."""
    return os.path.join(DATA, rel) if DATA else os.path.join(REPO, IN_REPO[rel])
sys.path.insert(0, HERE)

import candecode  # noqa: E402
import dbc2table  # noqa: E402

DEVICE = r"""
import gc, sys, time, array
sys.path.insert(0, sys.argv[4])
__import__(sys.argv[5])
Decoder = sys.modules[sys.argv[5]].Decoder
gc.collect()
m0 = gc.mem_alloc()
with open(sys.argv[1], "rb") as f:
    table = f.read()
gc.collect()
m1 = gc.mem_alloc()
dec = Decoder(table)
n = dec.nsignals
mod = bytearray(n)
tupd = array.array("i", bytes(4 * n))
tg = array.array("H", bytes(2 * n))
for k in range(n):
    tg[k] = k
dec.bind(mod, tupd, tg)
gc.collect()
heap = gc.mem_alloc() - m0
state = gc.mem_alloc() - m1
with open(sys.argv[2], "rb") as f:
    buf = f.read()
nfr = int(sys.argv[3])
budget = float(sys.argv[6])
# warm-up, then repeat whole passes until the time budget is used
sig = dec.feed_batch(buf, nfr, 1)
reps = 0
t0 = time.ticks_us()
el = 0
while el < budget * 1e6 or reps < 1:
    sig = dec.feed_batch(buf, nfr, reps + 2)
    reps += 1
    el = time.ticks_diff(time.ticks_us(), t0)
print(reps, el, heap, sig, state)
"""

PY_SHIM = "def ptr8(x):\n    return x\n\n\nptr16 = ptr32 = ptr8\n"


def python_variant(dst_dir):
    """Write the decoder without @micropython.viper (pure-Python path) as pydecoder.py."""
    src = open(os.path.join(LIB, "ovms", "can", "decoder.py")).read()
    src = re.sub(r"(?m)^[ \t]*@micropython\.viper[ \t]*\n", "", src)
    with open(os.path.join(dst_dir, "pydecoder.py"), "w") as f:
        f.write(PY_SHIM + src)
    return "pydecoder"


def _run_device(table_path, rec_path, nfr, libdir, module, seconds, heap="2M"):
    mp = candecode.find_tool("micropython", "OVMS_MICROPYTHON")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DEVICE)
        script = f.name
    try:
        r = subprocess.run([mp, "-X", "heapsize=" + heap, script, table_path, rec_path,
                            str(nfr), libdir, module, str(seconds)],
                           capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(script)
    if r.returncode != 0:
        raise RuntimeError("micropython failed: %s%s" % (r.stdout[-2000:], r.stderr[-2000:]))
    reps, el, heap_b, sig, state = (int(x) for x in r.stdout.split())
    return nfr * reps / (el / 1e6), heap_b, sig, state


def bench_decode(a):
    warn = None if a.quiet else (lambda m: print("bench: warning: " + m, file=sys.stderr))
    db = dbc2table.load_dbc(a.dbc)
    table = dbc2table.compile_dbc(db)
    known = {(m.is_extended_frame, m.frame_id): m for m in db.messages}
    frames = [f for f in candecode.read_log(a.log, a.bus, warn) if (f[3], f[2]) in known]
    if not frames:
        raise SystemExit("bench: no frame of %s is defined in %s" % (a.log, a.dbc))
    with tempfile.TemporaryDirectory() as tmp:
        tp = os.path.join(tmp, "table.bin")
        rp = os.path.join(tmp, "frames.bin")
        with open(tp, "wb") as f:
            f.write(table)
        recs = candecode.pack_records(frames)
        with open(rp, "wb") as f:
            f.write(recs)
        heap = "%d" % max(2 << 20, 2 * len(recs) + 2 * len(table) + (1 << 20))
        vfps, vheap, vsig, vstate = _run_device(tp, rp, len(frames), LIB, "ovms.can.decoder",
                                                a.seconds, heap)
        mod = python_variant(tmp)
        pfps, _, psig, _ = _run_device(tp, rp, len(frames), tmp, mod, a.seconds / 2, heap)
        if vsig != psig:
            raise RuntimeError("viper and python paths disagree (%d vs %d signals)" % (vsig, psig))
    dec = db.decode_message
    work = [(f[2], f[4]) for f in frames]
    for fid, data in work[:200]:
        dec(fid, data, allow_truncated=True)
    reps, t0 = 0, time.perf_counter()
    while True:
        for fid, data in work:
            dec(fid, data, allow_truncated=True)
        reps += 1
        el = time.perf_counter() - t0
        if el >= a.seconds / 2:
            break
    cfps = len(work) * reps / el
    out = {"frames": len(frames), "viper_fps": round(vfps), "python_fps": round(pfps),
           "cantools_fps": round(cfps), "peak_heap_bytes": vheap}
    if getattr(a, "detail", False):
        out.update(table_bytes=len(table), state_heap_bytes=vstate, signals=vsig)
    return out


SHIPPED = (
    ("kona_230112-7_can0", "kona_ev/dbc/pcan.dbc",
     "kona_ev/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log", "can0"),
    ("rav4_can0", "toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc",
     "toyota_rav4_comma2k19/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log",
     "can0"),
    ("rav4_can1", "toyota_rav4_comma2k19/dbc/toyota_adas.dbc",
     "toyota_rav4_comma2k19/logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log",
     "can1"),
)


def bench_mqtt_data(a):
    import bench_mqtt
    return bench_mqtt.data_usage(quiet=a.quiet)


def bench_mqtt_loop(a):
    import bench_mqtt
    return bench_mqtt.loop_health(a.loop_seconds, quiet=a.quiet)


def bench_memory(a):
    import bench_mem
    return bench_mem.run(a.heap, a.speed, quiet=a.quiet)


def bench_soak(a):
    """The soak test (tests_host/test_soak.py) for soak_seconds: replayed drive, TLS broker,
    5-s watchdog; passes with no reset, no crash-log entry, no heap growth."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OVMS_SOAK_S=str(a.soak_seconds))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        os.path.join(repo, "tests_host", "test_soak.py"), "-k", "soak_real"],
                       capture_output=True, text=True, env=env, cwd=repo)
    line = ([ln for ln in r.stdout.splitlines() if ln.startswith("soak ")] or [""])[0]
    if not a.quiet:
        print("soak %s" % ("passed" if r.returncode == 0 else "FAILED"), line, file=sys.stderr)
    return {"seconds": a.soak_seconds, "passed": r.returncode == 0, "summary": line}
def bench_poll(a):
    import bench_poll
    return bench_poll.run(int(getattr(a, "poll_seconds", 30)), a.heap, quiet=a.quiet)


def bench_reconnect(a):
    import bench_reconnect
    out = {}
    for ring in (16, None):     # the stock driver's ring, then the board's
        r = bench_reconnect.run(getattr(a, "reconnects", 5), steady_s=20, ring=ring, quiet=True)
        out["ring_%d" % r["ring"]] = r
        print("reconnect: CAN RX ring %d slots: %d overruns in 20 s steady, %.1f per reconnect"
              " (%d reconnects)" % (r["ring"], r["overruns_steady"], r["overruns_per_reconnect"],
                                    r["reconnects"]), file=sys.stderr)
    return out


def bench_gps(a):
    import bench_gps
    r = bench_gps.run(60)
    print("gps: parked %d B/h, driving %d B/h (MQTT, position metrics); parser heap %d B"
          % (r["parked_bytes_per_hour"], r["driving_bytes_per_hour"], r["parser_heap_bytes"]),
          file=sys.stderr)
    return r


def bench_all(a):
    out = {"decode": []}
    for name, dbc, log, bus in SHIPPED:
        ns = argparse.Namespace(dbc=corpus(dbc), log=corpus(log),
                                bus=bus, seconds=a.seconds, quiet=True, detail=True)
        r = bench_decode(ns)
        r = dict(case=name, **r)
        r["viper_vs_cantools"] = round(r["viper_fps"] / r["cantools_fps"], 2)
        r["viper_vs_python"] = round(r["viper_fps"] / r["python_fps"], 2)
        out["decode"].append(r)
        print("decode %-10s viper %.2fM frames/s = %.1fx cantools, %.1fx pure Python; heap %d B"
              % (name, r["viper_fps"] / 1e6, r["viper_vs_cantools"], r["viper_vs_python"],
                 r["peak_heap_bytes"]), file=sys.stderr)
    a.quiet = False
    a.loop_seconds = 20
    out["mqtt_data"] = bench_mqtt_data(a)
    out["mqtt_loop"] = bench_mqtt_loop(a)
    out["memory"] = bench_memory(a)
    a.soak_seconds = 600
    out["soak"] = bench_soak(a)
    out["poll"] = bench_poll(a)
    out["reconnect"] = bench_reconnect(a)
    out["gps"] = bench_gps(a)
    return out


COMMANDS = {"decode": bench_decode, "mqtt-data": bench_mqtt_data, "mqtt-loop": bench_mqtt_loop,
            "memory": bench_memory, "soak": bench_soak, "poll": bench_poll,
            "reconnect": bench_reconnect, "gps": bench_gps, "all": bench_all}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode", help="CAN decoder frames/s and heap")
    d.add_argument("--dbc", required=True)
    d.add_argument("--log", required=True)
    d.add_argument("--bus")
    d.add_argument("--seconds", type=float, default=1.0, help="time budget per decoder")
    d.add_argument("--quiet", action="store_true")
    for name, text in (("mqtt-data", "MQTT bytes for a drive + idle day, ours vs OVMS v3"),
                       ("mqtt-loop", "worst event-loop stall and command round trip"),
                       ("memory", "app heap through a replayed drive on the virtual device"),
                       ("poll", "poller round trips/s, heap and loop stall (60 requests, can-isotp ECU)")):
        x = sub.add_parser(name, help=text)
        x.add_argument("--quiet", action="store_true")
        x.add_argument("--loop-seconds", type=float, default=20)
        x.add_argument("--heap", default="100K")
        x.add_argument("--speed", type=float, default=1.0)
        x.add_argument("--poll-seconds", type=int, default=30)
    gp = sub.add_parser("gps", help="GPS MQTT bytes per hour parked / driving, parser heap")
    gp.add_argument("--quiet", action="store_true")
    rc = sub.add_parser("reconnect", help="CAN overruns per MQTT reconnect, stock vs board ring")
    rc.add_argument("--reconnects", type=int, default=5)
    rc.add_argument("--quiet", action="store_true")
    so = sub.add_parser("soak", help="replayed drive: no watchdog reset, crash or heap growth")
    so.add_argument("--soak-seconds", type=float, default=600)
    so.add_argument("--quiet", action="store_true")
    al = sub.add_parser("all", help="every benchmark on the shipped data")
    al.add_argument("--seconds", type=float, default=1.0)
    al.add_argument("--heap", default="100K", help="ESP32 heap emulated by the virtual device")
    al.add_argument("--speed", type=float, default=1.0)
    a = ap.parse_args(argv)
    try:
        print(json.dumps(COMMANDS[a.cmd](a)))
    except (dbc2table.CompileError, RuntimeError, OSError) as e:
        print("bench: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
