#!/usr/bin/env python3
"""CAN frames lost while the MQTT link is re-established, measured on the virtual device.

    bench_reconnect.py [--reconnects 5] [--blackhole-s 0] [--steady-s 20] [--ring N] [--log FILE]

The virtual device replays a real drive (1x, the RAV4's ~1,650 frames/s on two buses, or
--log) with the app provisioned as a real module against a local TLS mosquitto reached
through a TCP proxy. After the link is up and the start-up is over, it counts the CAN RX
ring's overruns (m.can0.overruns) in a steady window of --steady-s seconds, then cuts the
link --reconnects times (the proxy resets the connection; with --blackhole-s it first
forwards nothing for that long, a dead cellular link the keepalive has to detect) and waits
each time until the module is back (LWT `no`, then `yes`). Printed: overruns in the steady
window and per reconnect, reconnect times, the ring length (--ring, default the board's:
firmware/boards/MICRO_OVMS/mpconfigboard.h; the stock ESP32 driver has 16)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from broker import Broker  # noqa: E402
from mqttpeer import Client  # noqa: E402
from netproxy import Proxy  # noqa: E402

DRIVE = os.path.join(REPO, "firmware", "vehicles", "rv", "logs", "comma2k19_rav4_seg40.log.gz")


def run(reconnects=5, blackhole_s=0.0, steady_s=20.0, ring=None, log=DRIVE, quiet=False):
    d = tempfile.mkdtemp(prefix="bench-reconnect-")
    b = px = dev = c = None
    try:
        b = Broker(os.path.join(d, "broker")).start()
        px = Proxy(b.tls_port)
        root = os.path.join(d, "flash")
        args = [sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root", root,
                "--pty", root + ".pty", "--heap", "100K", "--log", root + ".console",
                "--can-log", log]
        if ring:
            args += ["--ring", str(ring)]
        dev = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for ln in dev.stdout:
            if ln.startswith("socketcand:"):
                break
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", root + ".pty",
                            "provision", "--wifi", "car", "wifipw", "--mqtt-host", "localhost",
                            "--mqtt-port", str(px.port), "--ca", b.ca, "--type", "RV", "--id", "RC"],
                           capture_output=True, text=True, timeout=180)
        if r.returncode:
            raise RuntimeError("provision failed: " + r.stdout + r.stderr)
        c = Client(b, "ovms//RC/", client_id="bench-reconnect")
        c.wait("metric/s/v3/connected", lambda v: v == "yes", timeout=120)
        time.sleep(5)                       # start-up (first full publish, vehicle start) over
        o0 = c.number("m.can0.overruns")
        time.sleep(steady_s)
        o1 = c.number("m.can0.overruns")
        times = []
        for _ in range(reconnects):
            if blackhole_s:
                px.blackhole(True)
                time.sleep(blackhole_s)
                px.blackhole(False)
            px.drop()
            c.wait("metric/s/v3/connected", lambda v: v == "no", timeout=300)
            t = time.time()
            c.wait("metric/s/v3/connected", lambda v: v == "yes", timeout=120)
            times.append(round(time.time() - t, 1))
            time.sleep(2)                   # the full publish after the reconnect
        o2 = c.number("m.can0.overruns")
        frames = c.number("m.can0.frames")
    finally:
        if c:
            c.close()
        if dev and dev.poll() is None:
            dev.kill()
            dev.wait()
        if px:
            px.close()
        if b:
            b.stop()
        shutil.rmtree(d, ignore_errors=True)
    if ring is None:
        import vdev
        ring = vdev.board_ring()
    out = {"ring": ring, "steady_s": steady_s, "overruns_steady": o1 - o0,
           "reconnects": reconnects, "blackhole_s": blackhole_s, "reconnect_s": times,
           "overruns_reconnects": o2 - o1,
           "overruns_per_reconnect": round((o2 - o1) / reconnects, 1) if reconnects else 0,
           "frames": frames}
    if not quiet:
        print("CAN RX ring %d slots: %d overruns in %.0f s steady; %d over %d reconnects "
              "(%.1f per reconnect; back after %s s)" % (
                  ring, out["overruns_steady"], steady_s, out["overruns_reconnects"], reconnects,
                  out["overruns_per_reconnect"], times))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reconnects", type=int, default=5)
    ap.add_argument("--blackhole-s", type=float, default=0)
    ap.add_argument("--steady-s", type=float, default=20)
    ap.add_argument("--ring", type=int, default=None)
    ap.add_argument("--log", default=DRIVE)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.reconnects, a.blackhole_s, a.steady_s, a.ring, a.log)))


if __name__ == "__main__":
    main()
