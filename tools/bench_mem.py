#!/usr/bin/env python3
"""Memory benchmark: the whole app on the virtual device through one replayed drive.

    bench_mem.py [--heap 100K] [--speed 1]

The virtual device boots the firmware (frozen app, --heap for the firmware), is provisioned
against a local TLS mosquitto like `make sim`, and replays the recorded RAV4 drive once. Every
2 s a client asks for the module's m.* metrics over MQTT (client/<cid>/request/metric): the
live heap after the firmware's last collection (m.freeram) and the lowest free heap seen
(m.freeram.min, garbage included: the real peak). Prints peak and steady-state heap in use,
the growth between the first and last quarter of the drive (after a 10 s warm-up: boot, TLS
connect, full republish), and any MemoryError on the console.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from broker import Broker  # noqa: E402
from vdev import heap_bytes  # noqa: E402

DRIVE = os.path.join(REPO, "firmware", "vehicles", "rv", "logs", "comma2k19_rav4_seg40.log.gz")
DRIVE_S = 60.0
WARMUP_S = 10.0


def run(heap="100K", speed=1.0, quiet=False):
    import paho.mqtt.client as mqtt
    d = tempfile.mkdtemp(prefix="bench-mem-")
    os.chmod(d, 0o755)
    broker = Broker(os.path.join(d, "broker")).start()
    flash = os.path.join(d, "flash")
    console = os.path.join(d, "console.log")
    dev = subprocess.Popen([sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root", flash,
                            "--can-log", DRIVE, "--speed", str(speed), "--heap", heap, "--once",
                            "--pty", os.path.join(d, "pty"), "--log", console],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = []
    lock = threading.Lock()
    try:
        scale = 1
        while True:
            line = dev.stdout.readline()
            if line.startswith("heap: "):
                scale = int(line.split("x")[-1])
            if not line or line.startswith("can-tx"):
                break
        subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port",
                        os.path.join(d, "pty"), "provision", "--wifi", "bench", "bench",
                        "--mqtt-host", "localhost", "--mqtt-port", str(broker.tls_port),
                        "--ca", broker.ca, "--type", "RV", "--id", "BENCH"],
                       check=True, capture_output=True, timeout=120)
        t0 = time.time()
        cur = {}

        def on_msg(c, u, m):
            name = m.topic.split("/metric/", 1)[-1].replace("/", ".")
            if name in ("m.freeram", "m.freeram.min") and not m.retain:
                with lock:
                    cur[name] = int(m.payload)
                    if name == "m.freeram":
                        samples.append((time.time() - t0, int(m.payload), cur.get("m.freeram.min")))

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-mem")
        c.on_message = on_msg
        c.connect("127.0.0.1", broker.port)
        c.subscribe("ovms/+/BENCH/metric/m/freeram/#", qos=0)
        c.subscribe("ovms/+/BENCH/metric/m/freeram", qos=0)
        c.loop_start()
        end = t0 + DRIVE_S / speed + 10
        while time.time() < end:
            c.publish("ovms//BENCH/client/bench-mem/request/metric", "m.freeram*", qos=1)
            time.sleep(2)
        c.loop_stop()
        c.disconnect()
    finally:
        dev.terminate()
        dev.wait()
        broker.stop()
    text = open(console, "rb").read().decode(errors="replace") if os.path.exists(console) else ""
    shutil.rmtree(d, ignore_errors=True)
    size = heap_bytes(heap) * scale     # the firmware's heap in this host's bytes
    # the first WARMUP_S: boot, Wi-Fi, TLS connect and the full republish (not steady state)
    live = [(t, size - f) for t, f, _ in samples if t >= WARMUP_S]
    lows = [m for _, _, m in samples if m is not None]
    out = {"heap_bytes": size, "word_scale": scale, "samples": len(live), "memory_errors": text.count("MemoryError"),
           "series": [(round(t, 1), u) for t, u in live]}
    if live:
        n = len(live)
        q1 = [u for _, u in live[:max(1, n // 4)]]
        q4 = [u for _, u in live[-max(1, n // 4):]]
        out.update(steady_used_bytes=round(sum(q4) / len(q4)),
                   first_quarter_used_bytes=round(sum(q1) / len(q1)),
                   growth_bytes=round(sum(q4) / len(q4) - sum(q1) / len(q1)),
                   peak_used_bytes=size - min(lows) if lows else None)
    if not quiet:
        print("memory: firmware heap %s = %d bytes on this host (x%d: same GC blocks as the ESP32), "
              "%d samples over the drive" % (heap, size, scale, len(live)), file=sys.stderr)
        print("  peak in use %s, steady state %s, growth first->last quarter %s bytes, "
              "MemoryErrors %d" % (out.get("peak_used_bytes"), out.get("steady_used_bytes"),
                                   out.get("growth_bytes"), out["memory_errors"]), file=sys.stderr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heap", default="100K", help="ESP32 heap to emulate (vdev --heap)")
    ap.add_argument("--speed", type=float, default=1.0)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.heap, a.speed)))


if __name__ == "__main__":
    main()
