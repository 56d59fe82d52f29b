#!/usr/bin/env python3
"""Poller benchmark: a 60-request poll list on the virtual device against a can-isotp ECU.

    bench_poll.py [--seconds 30] [--heap 100K]

The virtual device runs the firmware's CAN task and poller (app stopped, --heap for the
firmware) with 60 UDS requests (22 01xx, 1 s interval each: at most 60 requests/s) to one
ECU simulated on the host by can-isotp over the device's socketcand server, answering each
with 40 bytes (a first frame, 5 consecutive frames, one flow control). Prints answers per
second, the mean and worst round trip, the poller's heap (lists, buffers, per-ECU counts),
heap growth between the first and the last quarter of the run, and the event loop's worst
stall (a task asking for 10 ms sleeps, measured while polling)."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)

DEVICE = """
import asyncio, gc, time
from ovms import metrics
from ovms.can import bus as canbus
from ovms.poll import poller
SECONDS = %d
N = 60
async def main():
    bs = canbus.start(None, listen_only=False, hw=(1,), extra={0: []})
    metrics.set("v.e.on", True)
    entries = tuple((0, 0x7E4, 0x7EC, 0, bytes((0x22, 0x01, k)), (1, 1, 1, 1), -1,
                     (("xbench.v%%d" %% k, 0, 2, 0, 0, 0.1, 0),)) for k in range(N))
    gc.collect()
    m0 = gc.mem_alloc()
    co = poller.start((entries, None, {"gap": 0}), bs)
    gc.collect()
    heap = gc.mem_alloc() - m0
    asyncio.create_task(co)
    p = poller.current()
    worst = [0]
    async def probe():
        while True:
            t = time.ticks_ms()
            await asyncio.sleep_ms(10)
            late = time.ticks_diff(time.ticks_ms(), t) - 10
            if late > worst[0]:
                worst[0] = late
    pr = asyncio.create_task(probe())
    await asyncio.sleep_ms(2000)
    worst[0] = 0
    a0, t0 = p.polls, time.ticks_ms()
    samples = []
    for i in range(SECONDS):
        await asyncio.sleep_ms(1000)
        gc.collect()
        samples.append(gc.mem_alloc())
    dt = time.ticks_diff(time.ticks_ms(), t0) / 1000
    q = max(1, len(samples) // 4)
    grow = sum(samples[-q:]) // q - sum(samples[:q]) // q
    print("RESULT", p.polls - a0, dt, heap, grow, worst[0], p.requests, gc.mem_free())
    pr.cancel()
    p.stop()
    canbus.stop()
    await asyncio.sleep_ms(50)
asyncio.run(main())
"""


def run(seconds=30, heap="100K", quiet=False):
    import can
    import isotp
    d = tempfile.mkdtemp(prefix="bench-poll-")
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root",
                             os.path.join(d, "dev"), "--pty", os.path.join(d, "pty"), "--heap", heap],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    info = {}
    try:
        while "socketcand" not in info:
            ln = proc.stdout.readline()
            if not ln:
                raise RuntimeError("virtual device did not start")
            k, _, v = ln.partition(": ")
            info[k] = v.strip()
        host, port = info["socketcand"].split(":")
        mpremote = os.path.join(os.path.dirname(sys.executable), "mpremote")
        subprocess.run([mpremote, "connect", os.path.join(d, "pty"), "exec", "1"],
                       capture_output=True, timeout=60)
        bus = can.Bus(interface="socketcand", host=host, port=int(port), channel="can0",
                         tcp_tune=True)
        notifier = can.Notifier(bus, [])
        stack = isotp.NotifierBasedCanStack(
            bus, notifier, address=isotp.Address(isotp.AddressingMode.Normal_11bits, rxid=0x7E4,
                                                 txid=0x7EC),
            params=dict(tx_padding=0xAA, stmin=0, blocksize=0))
        stack.start()
        stop = threading.Event()
        rtt = []

        def ecu():
            while not stop.is_set():
                req = stack.recv(block=True, timeout=0.1)
                if req:
                    t = time.monotonic()
                    stack.send(bytes([0x62]) + bytes(req[1:3]) + bytes(range(37)))
                    rtt.append(t)
        th = threading.Thread(target=ecu, daemon=True)
        th.start()
        r = subprocess.run([mpremote, "connect", os.path.join(d, "pty"), "resume", "exec",
                            DEVICE % seconds], capture_output=True, text=True, timeout=seconds + 120)
        stop.set()
        th.join(2)
        stack.stop()
        notifier.stop()
        bus.shutdown()
        m = re.search(r"RESULT (\d+) ([\d.]+) (\d+) (-?\d+) (\d+) (\d+) (\d+)", r.stdout)
        if not m:
            raise RuntimeError("poll bench failed: %s %s" % (r.stdout[-2000:], r.stderr[-500:]))
        n, dt, ph, grow, worst, reqs, free = m.groups()
        out = {"requests_in_list": 60, "answers_per_s": round(int(n) / float(dt), 1),
               "ms_per_round_trip": round(1000 * float(dt) / max(1, int(n)), 1),
               "poller_heap_bytes": int(ph), "heap_growth_bytes": int(grow),
               "worst_loop_stall_ms": int(worst), "seconds": float(dt), "requests": int(reqs),
               "free_heap_bytes": int(free)}
        if not quiet:
            print("poll: %.1f answers/s for a 60-request list (%.1f ms per round trip, limit 60/s), "
                  "poller heap %d B, growth %d B over %.0f s, worst loop stall %d ms"
                  % (out["answers_per_s"], out["ms_per_round_trip"], out["poller_heap_bytes"],
                     out["heap_growth_bytes"], out["seconds"], out["worst_loop_stall_ms"]),
                  file=sys.stderr)
        return out
    finally:
        proc.kill()
        proc.wait()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--heap", default="100K")
    a = ap.parse_args(argv)
    print(json.dumps(run(a.seconds, a.heap)))


if __name__ == "__main__":
    main()
