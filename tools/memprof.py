#!/usr/bin/env python3
"""memprof: heap cost of app modules and steps, with lib/ frozen as on the board (ROMFS + qstrs).

    python tools/memprof.py [--heap 400K] SCRIPT.py

SCRIPT runs on the micropython binary with lib/ mounted from a ROMFS image and the frozen
app's qstrs pre-interned (as tools/vdev.py does), so what it measures is what the firmware
pays on a board (objects, not bytecode). It can call m("label") to print the live heap after
a collection and the growth since the previous call. Default SCRIPT: import every app module.
"""
import argparse
import os
import subprocess
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)

import vdev  # noqa: E402

PRELUDE = """
import gc, os, sys, vfs
with open(%(rom)r, "rb") as f:
    _img = f.read()
_n = 0
with open(%(qstrs)r) as f:
    for _l in f:
        getattr(None, _l[:-1], None)
        _n += 1
        if _n %% 16 == 0:
            gc.collect()
vfs.mount(vfs.VfsRom(_img), "/rom")
sys.path[:0] = ["/rom/lib"]
def m(label, _last=[0]):
    gc.collect()
    a = gc.mem_alloc()
    if _last[0]:
        print("%%-32s %%7d  %%+7d" %% (label, a - _base[0], a - _last[0]))
    _last[0] = a
_base = [0]
gc.collect()
_base[0] = gc.mem_alloc()
m("start")
"""

DEFAULT = """
for name in ("ovms.config", "ovms.metrics", "ovms.can.decoder", "ovms.can.vehicle", "ovms.can.bus",
             "ovms.shell", "ovms.mqtt", "ovms.v3.outbox", "ovms.v3.sched", "ovms.v3.server",
             "ovms.net", "ovms.health", "ovms.events", "ovms.app"):
    __import__(name)
    m(name)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("script", nargs="?")
    ap.add_argument("--heap", default="400K")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        rom = vdev.build_rom(d)
        vdev.calibrate_heap(vdev.heap_bytes(a.heap), rom)  # writes rom + ".qstrs"
        body = open(a.script).read() if a.script else DEFAULT
        path = os.path.join(d, "prof.py")
        with open(path, "w") as f:
            f.write(PRELUDE % {"rom": rom, "qstrs": rom + ".qstrs"} + body)
        print("%-32s %7s  %7s" % ("step", "live", "growth"))
        return subprocess.run([vdev.micropython_binary(), "-X", "heapsize=" + a.heap, path]).returncode


if __name__ == "__main__":
    sys.exit(main())
