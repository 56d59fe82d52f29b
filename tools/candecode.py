#!/usr/bin/env python3
"""Decode a candump -L log with the DEVICE decoder (lib/ovms/can/decoder.py on micropython).

Usage:
  candecode.py --dbc FILE.dbc --log FILE.log [--bus NAME] [--messages all|mapped]
               [--skip-unsupported] [--raw]

Prints one JSON object per decoded frame, in log order:
  {"t": <timestamp>, "id": <frame id>, "signals": {<DBC signal>: <physical value>}}
Values are what cantools' decode_message(data, decode_choices=True, allow_truncated=True)
gives: int when scale/offset are integral, float otherwise, the VAL_ label when the raw
value has one.  A frame shorter than its message yields only the signals whose bytes all
arrived; bytes beyond the message length are ignored; frames of ids the DBC does not define
print nothing.  --bus keeps only frames logged on that interface.  --messages mapped decodes
only the signals a vehicle mapping (firmware/vehicles/*/*.json, or $OVMS_VEHICLES_DIR/*/*.json)
takes from this DBC (multiplexers they depend on are decoded but not printed).
A frame of a multiplexed message whose multiplexer value has no signals prints the
multiplexer and the unmultiplexed signals (cantools raises an error there).
The DBC is compiled on the host (tools/dbc2table.py); anything the decoder cannot
represent is an error on stderr and exit status 2 (--skip-unsupported: drop those
messages with a warning instead).  Flaws of the DBC itself that cantools cannot decode
either (a signal beyond its message's length, signals under a multiplexer name the message
does not have) give no value and a warning.
"""
import argparse
import ast
import glob
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LIB = os.path.join(REPO, "lib")
sys.path.insert(0, HERE)

import dbc2table  # noqa: E402

LINE_RE = re.compile(r"^\s*\((\d+(?:\.\d*)?)\)\s+(\S+)\s+([0-9A-Fa-f]{1,8})#(#?)([0-9A-Fa-f]*|R\d*)\s*$")

DEVICE = r"""
import sys
from ovms.can.decoder import Decoder
tf, rf = sys.argv[1], sys.argv[2]
with open(tf, "rb") as f:
    dec = Decoder(f.read())
with open(rf, "rb") as f:
    buf = f.read()
mv = memoryview(buf)
n = len(buf)
pos = 0
i = 0
w = sys.stdout.write
aux = int(sys.argv[3])
raw = int(sys.argv[4])
skip = bytearray(dec.nsignals)
for k in range(dec.nsignals):
    if aux and dec.info(k)[4] & 0x8000:
        skip[k] = 1
while pos + 5 <= n:
    b3 = buf[pos + 3]
    cid = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) | ((b3 & 0x1F) << 24)
    dl = buf[pos + 4]
    dec.feed(b3 >> 6, cid, (b3 >> 5) & 1, mv[pos + 5:pos + 5 + dl], dl, 0)
    pos += 5 + dl
    if dec.message >= 0:
        parts = [str(i)]
        for k in dec.touched:
            if not skip[k]:
                parts.append("%d=%r" % (k, dec.raw(k) if raw else dec.value(k, True, False)))
        w("\t".join(parts))
        w("\n")
    i += 1
"""


def find_tool(name, env):
    p = os.environ.get(env)
    if p:
        return p
    p = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(p):
        return p
    for d in (os.path.join(REPO, ".venv", "bin"),):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    import shutil
    return shutil.which(name) or name


def read_log(path, bus=None, warn=None):
    """candump -L lines (a .gz file too) -> [(t, iface, id, ext, data)] (bad lines warned and
    skipped)."""
    out = []
    bad = 0
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = LINE_RE.match(line)
            if not m:
                bad += 1
                if warn and bad <= 5:
                    warn("%s:%d: not a candump -L frame, skipped: %r" % (path, n, line.strip()[:80]))
                continue
            ts, iface, ids, fd, data = m.groups()
            if bus is not None and iface != bus:
                continue
            if data.startswith("R") or data.startswith("r"):
                continue          # remote frame: no data
            if fd:                # CAN FD: "##<flags><data>"
                data = data[1:]
            if len(data) % 2:
                bad += 1
                if warn and bad <= 5:
                    warn("%s:%d: odd number of hex digits, skipped" % (path, n))
                continue
            cid = int(ids, 16)
            ext = len(ids) > 3
            if cid >= 1 << 29:
                continue
            out.append((float(ts), iface, cid, ext, bytes.fromhex(data)))
    if bad and warn and bad > 5:
        warn("%s: %d malformed lines skipped" % (path, bad))
    return out


def pack_records(frames, bus_index=0):
    """Frames -> feed_batch records (4-byte LE id|ext<<29|bus<<30, dlc, data <= 64 bytes)."""
    out = bytearray()
    for fr in frames:
        cid, ext, data = fr[2], fr[3], fr[4][:64]
        out += struct.pack("<IB", cid | (int(bool(ext)) << 29) | (bus_index << 30), len(data))
        out += data
    return bytes(out)


def find_mapping_entries(dbc, bus=None, warn=None):
    """Entries of the vehicle mapping that takes signals from `dbc` (bus index set to 0)."""
    real = os.path.realpath(dbc)
    dbs = {}
    root = os.environ.get("OVMS_VEHICLES_DIR") or os.path.join(REPO, "firmware", "vehicles")
    for mp in sorted(glob.glob(os.path.join(root, "*", "*.json"))):
        try:
            m = dbc2table.load_mapping(mp)
        except dbc2table.CompileError:
            continue
        base = os.path.dirname(os.path.abspath(mp))
        names = [n for n, p in m["buses"].items()
                 if isinstance(p, str) and os.path.realpath(os.path.join(base, p)) == real]
        if not names:
            continue
        name = bus if bus in names else names[0]
        entries, buses = dbc2table.mapping_entries(mp, warn, dbs)
        idx = buses[name][0]
        sel = [e for e in entries if e.bus == idx]
        for e in sel:
            e.bus = 0
        return sel, mp
    raise dbc2table.CompileError("no vehicle mapping under firmware/vehicles/*/*.json uses %s"
                                 % dbc)


def decode(dbc, frames, messages="all", bus=None, skip_unsupported=False, warn=None,
           micropython=None, raw=False):
    """Yield (frame, {signal: value}) for every frame the DBC defines (device decoder).
    dbc: path or cantools Database; raw: raw values (cantools scaling=False,
    decode_choices=False) instead of physical values."""
    if messages == "mapped":
        entries, _ = find_mapping_entries(dbc, bus, warn)
        table = dbc2table.build(entries, warn)
    else:
        table = dbc2table.compile_dbc(dbc, 0, skip_unsupported, warn)
    names = dbc2table.signal_names(table)
    with tempfile.TemporaryDirectory() as tmp:
        tf = os.path.join(tmp, "table.bin")
        rf = os.path.join(tmp, "frames.bin")
        sf = os.path.join(tmp, "run.py")
        with open(tf, "wb") as f:
            f.write(table)
        with open(rf, "wb") as f:
            f.write(pack_records(frames))
        with open(sf, "w") as f:
            f.write("import sys\nsys.path.insert(0, %r)\n" % LIB + DEVICE)
        heap = max(4 << 20, 3 * os.path.getsize(rf) + 2 * len(table) + (1 << 20))
        mp = micropython or find_tool("micropython", "OVMS_MICROPYTHON")
        proc = subprocess.Popen([mp, "-X", "heapsize=%d" % heap, sf, tf, rf,
                                 "1" if messages == "mapped" else "0", "1" if raw else "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                parts = line.rstrip("\n").split("\t")
                sig = {}
                for p in parts[1:]:
                    k, tok = p.split("=", 1)
                    sig[names[int(k)]] = _parse(tok)
                yield frames[int(parts[0])], sig
        finally:
            proc.stdout.close()
            err = proc.stderr.read()
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError("micropython decoder failed (%d): %s" % (rc, err[-2000:]))


def _parse(tok):
    if tok[:1] in ("'", '"'):
        return ast.literal_eval(tok)
    try:
        return int(tok)
    except ValueError:
        return float(tok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dbc", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--bus", help="only frames logged on this interface (e.g. can1)")
    ap.add_argument("--messages", choices=("all", "mapped"), default="all")
    ap.add_argument("--skip-unsupported", action="store_true",
                    help="drop messages the decoder cannot represent (warn) instead of failing")
    ap.add_argument("--raw", action="store_true",
                    help="print raw values (no scale/offset, no VAL_ labels)")
    a = ap.parse_args(argv)

    def warn(msg):
        print("candecode: warning: " + msg, file=sys.stderr)
    try:
        frames = read_log(a.log, a.bus, warn)
        out = sys.stdout
        for fr, sig in decode(a.dbc, frames, a.messages, a.bus, a.skip_unsupported, warn,
                              raw=a.raw):
            out.write(json.dumps({"t": fr[0], "id": fr[2], "signals": sig}) + "\n")
    except dbc2table.CompileError as e:
        print("candecode: error: %s" % e, file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print("candecode: error: %s" % e, file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
