#!/usr/bin/env python3
"""Compile DBC files (+ a vehicle mapping) into the compact decode table the device loads.

Usage:
  dbc2table.py --dbc FILE.dbc [--bus N] [-o TABLE.bin] [--py MODULE.py] [--skip-unsupported]
  dbc2table.py --map VEHICLE.json [-o TABLE.bin] [--py MODULE.py]

`--dbc` compiles every message and signal of one DBC (bus index N, default 0).
`--map` compiles only the signals a vehicle mapping file names.  `-o` writes the binary
table; `--py` writes a freezable module `TABLE = b"..."` (load with
`ovms.can.decoder.Decoder(module.TABLE)`).  A summary goes to stderr.  Anything the device
decoder cannot represent exactly is an error naming the message and signal (exit 2).

Vehicle mapping file (JSON)
---------------------------
    {"vehicle": "KN", "name": "Hyundai Kona Electric",
     "buses": {"can0": "pcan.dbc", "can1": "ccan.dbc"},
     "metrics": {
        "v.b.soc":   {"bus": "can0", "message": "BMS_xx", "signal": "SOC",
                      "factor": 1.0, "add": 0.0},
        "xkn.b.foo": {"bus": "can0", "message": "...", "signal": "...", "unit": "V"}},
     ...}
- "buses": bus name -> DBC path (relative to the mapping file).  Bus names are "can0".."can3";
  the digit is the bus index the device passes to Decoder.feed().
- "metrics": metric name -> source signal.  "bus" may be omitted when there is one bus.
  "message" is the DBC message name (or its frame id as an int); "signal" the DBC signal name.
  Optional "factor"/"add": unit conversion, metric = physical * factor + add (folded into the
  table's metric scale/offset; Decoder.value(k, convert=False) still gives the DBC value).
  Optional "unit": unit label (default: the DBC unit).  Other keys in an entry, and unknown
  top-level keys ("commands", ...), are ignored here (other tools read them).
- One DBC signal may feed several metrics (it then appears once per metric in the table).

Table format (all little-endian; version 1)
-------------------------------------------
    header   "<4sBBHHHHHHHII": b"OVDT", version, flags (bit 0: wide references), nmsg,
             nsig, npiece, nconv, maxsig (most signals in one message), nmux, 0,
             nchoice, strings_len
    ranges   16 x "<H": [start, end) message indexes for group g = bus*2 + extended
    messages nmsg x "<IHHHHR": frame id, first signal, signal count, multiplexer signal
             (0xFFFF none), length (bytes), name
    signals  nsig x "<HBBBBHHHHRRRHHR": first piece, piece count (1|2), bytes needed,
             bit length, 0, flags (F_* below), multiplexer range (0xFFFF: not
             multiplexed), conversion, metric conversion, name, metric name, unit,
             message index, choice count, first choice
    muxes    nmux x "<II": multiplexer raw values lo, hi (signal decoded when lo <= mux <= hi)
    pieces   npiece x "<BBBB": LSB byte b0, right shift sh0 | direction << 3 (0 Intel: +1,
             1 Motorola: -1), byte count n, bit count (1..32)
    convs    nconv x "<ddBBBB": scale, offset, scale is int, offset is int, 0, 0
    choices  nchoice x "<qR": raw value, label
    strings  NUL-terminated UTF-8; name fields are offsets here (0 = "")
R is "H" (narrow) or "I" when flags bit 0 is set (strings or choices beyond 65535).
Signals of one message are contiguous, its multiplexer (if any) first.  A signal
multiplexed on several disjoint value ranges (SG_MUL_VAL_ with one multiplexer) appears
once per range; at most one of them matches a frame.  Messages are sorted by
(bus, extended, id) so the device finds them by binary search.  The table is read in
place (it can be a frozen bytes object in flash); the decoder copies only the per-frame
data (about 17 bytes per signal) into RAM.

Extraction (32-bit safe): each signal is one piece (<= 32 bits) or, for 33..64 bits, two
(low 32 bits, then the high bits).  A piece is read as
    v = d[b0] >> sh0; pos = 8 - sh0; b = b0
    repeat n-1 times: b += step; v |= d[b] << pos; pos += 8
    v &= (1 << bits) - 1          (computed as ((1 << (bits-1)) << 1) - 1)
Every shift is < 32 and bits above 31 are masked off, so a 32-bit machine word suffices.
Sign extension, two-piece combination, IEEE float reinterpretation and scale/offset
happen when a value is read, not per frame.
"""
import json
import math
import os
import re
import struct
import sys

MAGIC = b"OVDT"
VERSION = 1
HDR = "<4sBBHHHHHHHII"
RANGE = "<16H"
MUX = "<II"
PIECE = "<BBBB"
CONV = "<ddBBBB"


def formats(wide):
    """(MSG, SIG, CHOICE) struct formats for narrow/wide references."""
    r = "I" if wide else "H"
    return "<IHHHH" + r, "<HBBBBHHHH%s%s%sHH%s" % (r, r, r, r), "<q" + r

# signal flags (table "flags" field; Decoder.info() returns bits | flags << 8)
F_SIGNED = 0x01
F_FLOAT = 0x02
F_CHOICES = 0x04
F_MUXER = 0x08
F_MUXED = 0x10
F_INT = 0x20       # DBC physical value is an int (cantools: integral scale and offset)
F_MINT = 0x40      # metric value (after factor/add) is an int
F_AUX = 0x80       # included only because a mapped signal needs it (multiplexer)
F_BIGENDIAN = 0x100

MAX_BYTES = 64


class CompileError(Exception):
    """A DBC/mapping feature the decoder cannot represent (message names the place)."""


# ------------------------------------------------------------------ DBC loading
def _fix_header(text):
    if re.search(r"^\s*BU_\s*:", text, re.M):
        return text
    fixed, n = re.subn(r"(NS_\s*:[^\n]*\n(?:[ \t]+\S+[^\n]*\n)*)", r"\1\nBS_:\n\nBU_: XXX\n",
                       text, count=1)
    if n == 0:
        m = re.search(r"^\s*BO_\s", text, re.M)
        pos = m.start() if m else len(text)
        fixed = text[:pos] + "BS_:\n\nBU_: XXX\n\n" + text[pos:]
    return fixed


def _fix_comments(text):
    # "CM_ 145 "..." ;" (message comment without BO_) -> "CM_ BO_ 145 "...";"
    text = re.sub(r"^(\s*CM_\s+)(\d+\s+\")", r"\1BO_ \2", text, flags=re.M)
    # "CM_ SG_ 304 "...";" (signal comment without a signal name) -> dropped
    return re.sub(r"^\s*CM_\s+SG_\s+\d+\s+\"(?:[^\"\\]|\\.)*\"\s*;[ \t]*\n?", "", text,
                  flags=re.M)


def _fix_numbers(text):
    # ".25" / "-.5" inside "(scale,offset)" and "[min|max]"
    return re.sub(r"(?<=[(,|\[])(\s*-?)\.(\d)", r"\g<1>0.\2", text)


_REF_RE = r"((?:^|\n)\s*(?:BO_|CM_\s+BO_|CM_\s+SG_|VAL_|BA_\s+\"[^\"]*\"\s+BO_|" \
          r"BA_\s+\"[^\"]*\"\s+SG_|SG_MUL_VAL_|BO_TX_BU_|SIG_VALTYPE_)\s+)(\d+)"


def _fix_ext_ids(text):
    bad = {int(i) for i in re.findall(r"^\s*BO_\s+(\d+)\s", text, re.M)
           if 0x7FF < int(i) < 0x80000000}
    if not bad:
        return text

    def sub(m):
        i = int(m.group(2))
        return m.group(1) + (str(i | 0x80000000) if i in bad else m.group(2))
    return re.sub(_REF_RE, sub, text)


def _fix_unused_val(text):
    known = set()
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*BO_\s+(\d+)\s", line)
        if m:
            cur = m.group(1)
            continue
        m = re.match(r"\s*SG_\s+(\S+)", line)
        if m and cur is not None:
            known.add((cur, m.group(1)))
        elif line.strip() and not line[0].isspace():
            cur = None

    def sub(m):
        return m.group(0) if (m.group(1), m.group(2)) in known else ""
    return re.sub(r"^\s*VAL_\s+(\d+)\s+(\S+)\s(?:[^;\"]|\"[^\"]*\")*;[ \t]*\n?", sub, text,
                  flags=re.M)


_FIXES = (("missing BS_/BU_ header lines inserted", _fix_header),
          ("malformed CM_ comments normalised", _fix_comments),
          ("numbers like .25 normalised", _fix_numbers),
          ("29-bit ids without the extended flag marked extended", _fix_ext_ids),
          ("VAL_ tables for unknown signals dropped", _fix_unused_val))


def read_text(path):
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_dbc(path, warn=None):
    """Load a DBC with cantools (strict=False), normalising known community-DBC quirks
    in memory when the file does not load as is.  `warn(msg)` receives what was fixed."""
    import cantools
    text = read_text(path)
    try:
        return cantools.database.load_string(text, "dbc", strict=False)
    except Exception as first:
        err = first
    fixed, applied = text, []
    for what, fn in _FIXES:
        new = fn(fixed)
        if new != fixed:
            applied.append(what)
            fixed = new
    if applied:
        try:
            db = cantools.database.load_string(fixed, "dbc", strict=False)
        except Exception as e:
            err = e
        else:
            if warn:
                warn("%s: %s" % (path, "; ".join(applied)))
            return db
    raise CompileError("%s: cannot parse DBC: %s" % (path, err))


# ------------------------------------------------------------------ signal layout
def pieces_of(sig):
    """[(b0, sh0, dir, nbytes, mask)] and bytes needed for a cantools signal."""
    n = sig.length
    parts = [(0, n)] if n <= 32 else [(0, 32), (32, n - 32)]
    out = []
    if sig.byte_order == "little_endian":
        for off, ln in parts:
            p = sig.start + off
            out.append((p // 8, p % 8, 0, (p + ln - 1) // 8 - p // 8 + 1, (1 << ln) - 1))
        need = (sig.start + n - 1) // 8 + 1
    else:
        lsb = 8 * (sig.start // 8) + 7 - sig.start % 8 + n - 1   # network bit of the LSB
        for off, ln in parts:
            e = lsb - off
            out.append((e // 8, 7 - e % 8, 1, e // 8 - (e - ln + 1) // 8 + 1, (1 << ln) - 1))
        need = lsb // 8 + 1
    return out, need


def _is_int(v):
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def _where(msg, sig=None):
    s = 'message "%s" (0x%X)' % (msg.name, msg.frame_id)
    return s + (' signal "%s"' % sig.name if sig is not None else "")


def check_signal(msg, sig):
    """Raise CompileError if the decoder cannot represent `sig` exactly."""
    where = _where(msg, sig)
    if not 1 <= sig.length <= 64:
        raise CompileError("%s: unsupported length %d bits (1..64)" % (where, sig.length))
    if sig.is_float and sig.length not in (32, 64):
        raise CompileError("%s: unsupported float length %d (only IEEE 32 and 64 bit)"
                           % (where, sig.length))
    if sig.byte_order == "big_endian":
        if sig.start < 0 or 8 * (sig.start // 8) + 7 - sig.start % 8 + sig.length > 8 * MAX_BYTES:
            raise CompileError("%s: signal beyond %d bytes" % (where, MAX_BYTES))
    _, need = pieces_of(sig)
    if sig.start < 0:
        raise CompileError("%s: negative start bit" % where)
    if need > min(msg.length, MAX_BYTES):
        raise CompileError("%s: signal beyond message length (needs %d bytes, message has %d)"
                           % (where, need, msg.length))
    for v in (sig.scale, sig.offset):
        if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise CompileError("%s: unsupported scale/offset %r" % (where, v))
        if isinstance(v, int) and not -2 ** 53 <= v <= 2 ** 53:
            raise CompileError("%s: scale/offset %r out of range" % (where, v))
    for k in (sig.choices or {}):
        if not -2 ** 63 <= int(k) < 2 ** 63:
            raise CompileError("%s: choice value %r out of range" % (where, k))


def mux_info(msg):
    """(multiplexer signal or None); CompileError for extended/cascaded multiplexing."""
    muxers = [s for s in msg.signals if s.is_multiplexer]
    if not muxers:
        return None
    if len(muxers) > 1:
        raise CompileError("%s: %d multiplexer signals (%s): extended multiplexing "
                           "(SG_MUL_VAL_) is not supported" % (
                               _where(msg), len(muxers), ", ".join(s.name for s in muxers)))
    mx = muxers[0]
    if mx.multiplexer_ids:
        raise CompileError("%s: cascaded multiplexer (multiplexed on %s): extended "
                           "multiplexing (SG_MUL_VAL_) is not supported"
                           % (_where(msg, mx), mx.multiplexer_signal))
    if mx.length > 32 or mx.is_float:
        raise CompileError("%s: multiplexer must be an integer of <= 32 bits" % _where(msg, mx))
    if mx.scale != 1 or mx.offset != 0:
        raise CompileError("%s: multiplexer with scale/offset is not supported" % _where(msg, mx))
    for s in msg.signals:
        if s.multiplexer_signal != mx.name:
            continue  # an orphan (see orphans): never decoded
        for v in s.multiplexer_ids or ():
            if not 0 <= v < 2 ** 31:
                raise CompileError("%s: multiplexer value %d out of range 0..2**31-1"
                                   % (_where(msg, s), v))
    return mx


def orphans(msg):
    """Signals multiplexed by a name that is no multiplexer of the message (e.g. a DBC whose
    long-name attribute renamed the multiplexer only): cantools never decodes them."""
    muxers = [s.name for s in msg.signals if s.is_multiplexer]
    return [s for s in msg.signals if s.multiplexer_signal is not None
            and s.multiplexer_signal not in muxers]


def undecodable(msg):
    """Why cantools decodes no frame of msg at all (a signal needs bytes beyond the message
    length: every decode fails), or None."""
    for s in msg.signals:
        need = pieces_of(s)[1] if s.start >= 0 and 1 <= s.length <= 64 else 0
        if need > msg.length:
            return "%s: signal beyond message length (needs %d bytes, message has %d)" % (
                _where(msg, s), need, msg.length)
    return None


def overlaps(msg):
    """Names of signal pairs that share bits (multiplexed alternatives excepted)."""
    out = []
    bits = []
    for s in msg.signals:
        if s.length < 1 or s.length > 64:
            continue
        if s.byte_order == "little_endian":
            b = set(range(s.start, s.start + s.length))
        else:
            m = 8 * (s.start // 8) + 7 - s.start % 8
            b = {8 * (n // 8) + 7 - n % 8 for n in range(m, m + s.length)}
        for t, tb, tm in bits:
            same_branch = not (s.multiplexer_ids and tm and s.multiplexer_ids != tm)
            if same_branch and b & tb:
                out.append((t.name, s.name))
        bits.append((s, b, s.multiplexer_ids))
    return out


# ------------------------------------------------------------------ table building
class _Strings:
    def __init__(self):
        self.buf = bytearray(b"\0")
        self.idx = {"": 0}

    def add(self, s):
        s = s or ""
        if s not in self.idx:
            b = s.encode("utf-8")
            if b"\0" in b:
                raise CompileError("NUL in name %r" % s)
            self.idx[s] = len(self.buf)
            self.buf += b + b"\0"
        return self.idx[s]


class Entry:
    """One table signal: a DBC signal (of `msg` on `bus`) and its optional metric."""

    def __init__(self, bus, msg, sig, metric="", unit=None, factor=1, add=0, aux=False):
        self.bus, self.msg, self.sig = bus, msg, sig
        self.metric, self.factor, self.add, self.aux = metric, factor, add, aux
        self.unit = sig.unit if unit is None else unit


def build(entries, warn=None, messages=()):
    """entries: list of Entry -> table bytes.  `messages`: extra (bus, cantools message)
    pairs to include even without signals (their frames decode to {})."""
    groups = {}
    for bus, msg in messages:
        groups.setdefault((bus, 1 if msg.is_extended_frame else 0, msg.frame_id), [msg, []])
    for e in entries:
        if not 0 <= e.bus <= 3:
            raise CompileError("bus index %d out of range 0..3" % e.bus)
        key = (e.bus, 1 if e.msg.is_extended_frame else 0, e.msg.frame_id)
        g = groups.setdefault(key, [e.msg, []])
        if g[0] is not e.msg:
            raise CompileError("%s and %s: same frame id on bus %d"
                               % (_where(g[0]), _where(e.msg), e.bus))
        g[1].append(e)
    keys = sorted(groups)
    strings = _Strings()
    convs, conv_idx = [], {}

    def conv(scale, offset):
        k = (type(scale), scale, type(offset), offset)
        if k not in conv_idx:
            conv_idx[k] = len(convs)
            convs.append(struct.pack(CONV, float(scale), float(offset),
                                     isinstance(scale, int), isinstance(offset, int), 0, 0))
        return conv_idx[k]

    ranges = [0] * 16
    msgs, sigs, pieces, choices, muxes = [], [], [], [], []
    maxsig = 1
    for mi, key in enumerate(keys):
        bus, ext, fid = key
        g = 2 * bus + ext
        if ranges[2 * g + 1] == 0:
            ranges[2 * g] = mi
        ranges[2 * g + 1] = mi + 1
        msg, ents = groups[key]
        if fid >= 1 << 29 or (not ext and fid > 0x7FF):
            raise CompileError("%s: frame id out of range" % _where(msg))
        mx = mux_info(msg)
        if mx is not None and not any(e.sig is mx for e in ents):
            ents.append(Entry(bus, msg, mx, aux=True))
        order = {id(s): n for n, s in enumerate(msg.signals)}
        ents.sort(key=lambda e: (e.sig is not mx, order[id(e.sig)]))
        for a, b in overlaps(msg):
            if warn and any(e.sig.name in (a, b) for e in ents):
                warn("%s: signals %s and %s overlap (decoded at their DBC bit positions)"
                     % (_where(msg), a, b))
        first = len(sigs)
        lost = orphans(msg)
        for e in ents:
            s = e.sig
            if s in lost:
                raise CompileError("%s: multiplexed by %s, which is no multiplexer of the "
                                   "message (cantools never decodes it)"
                                   % (_where(msg, s), s.multiplexer_signal))
            check_signal(msg, s)
            ps, need = pieces_of(s)
            flags = 0
            if s.is_signed:
                flags |= F_SIGNED
            if s.is_float:
                flags |= F_FLOAT
            if s.choices:
                flags |= F_CHOICES
            if s is mx:
                flags |= F_MUXER
            if s.byte_order == "big_endian":
                flags |= F_BIGENDIAN
            if e.aux:
                flags |= F_AUX
            runs = [None]
            if s.multiplexer_ids:
                flags |= F_MUXED
                top = 1 << (mx.length - 1 if mx.is_signed else mx.length)
                ids = sorted(set(s.multiplexer_ids))
                bad = [v for v in ids if not 0 <= v < top]
                if bad and warn:
                    warn("%s: multiplexer value(s) %s can never occur (ignored)"
                         % (_where(msg, s), bad))
                runs = []
                for v in ids:
                    if v in bad:
                        continue
                    if runs and runs[-1][1] == v - 1:
                        runs[-1] = (runs[-1][0], v)
                    else:
                        runs.append((v, v))
            scale, offset = s.scale, s.offset
            if not s.is_float and _is_int(scale) and _is_int(offset):
                flags |= F_INT
                scale, offset = int(scale), int(offset)
            c = conv(scale, offset)
            f, a = e.factor, e.add
            if f == 1 and a == 0:
                mc = c
                if flags & F_INT:
                    flags |= F_MINT
            else:
                ms, mo = scale * f, offset * f + a
                if not s.is_float and _is_int(ms) and _is_int(mo):
                    flags |= F_MINT
                    ms, mo = int(ms), int(mo)
                mc = conv(ms, mo)
            ch = sorted((int(k), str(v)) for k, v in (s.choices or {}).items())
            cfirst = len(choices)
            for v, label in ch:
                choices.append((v, strings.add(label)))
            p0 = len(pieces)
            for b0, sh, dr, nb, mask in ps:
                pieces.append(struct.pack(PIECE, b0, sh | dr << 3, nb, mask.bit_length()))
            for run in runs:
                mux = 0xFFFF
                if run is not None:
                    mux = len(muxes)
                    muxes.append(struct.pack(MUX, *run))
                sigs.append((p0, len(ps), need, s.length, 0, flags, mux, c, mc,
                             strings.add(s.name), strings.add(e.metric),
                             strings.add(e.unit or ""), mi, len(ch), cfirst))
        n = len(sigs) - first
        maxsig = max(maxsig, n)
        muxk = first if mx is not None else 0xFFFF
        msgs.append((fid, first, n, muxk, min(msg.length, 0xFFFF), strings.add(msg.name)))
    for what, n in (("messages", len(msgs)), ("signals", len(sigs)), ("pieces", len(pieces)),
                    ("conversions", len(convs)), ("multiplexer ranges", len(muxes))):
        if n > 0xFFFE:
            raise CompileError("too many %s (%d)" % (what, n))
    wide = len(strings.buf) > 0xFFFF or len(choices) > 0xFFFF
    fm, fs, fc = formats(wide)
    hdr = struct.pack(HDR, MAGIC, VERSION, 1 if wide else 0, len(msgs), len(sigs), len(pieces),
                      len(convs), maxsig, len(muxes), 0, len(choices), len(strings.buf))
    return b"".join([hdr, struct.pack(RANGE, *ranges)] + [struct.pack(fm, *m) for m in msgs]
                    + [struct.pack(fs, *x) for x in sigs] + muxes + pieces + convs
                    + [struct.pack(fc, *c) for c in choices] + [bytes(strings.buf)])


def layout(table):
    """Header fields and section offsets of a table (host-side reader)."""
    h = struct.unpack_from(HDR, table)
    wide = h[2] & 1
    fm, fs, fc = formats(wide)
    L = {"nmsg": h[3], "nsig": h[4], "npiece": h[5], "nconv": h[6], "maxsig": h[7],
         "nmux": h[8], "nchoice": h[10], "nstr": h[11], "MSG": fm, "SIG": fs, "CHOICE": fc}
    o = struct.calcsize(HDR) + struct.calcsize(RANGE)
    for name, fmt, n in (("msgs", fm, h[3]), ("sigs", fs, h[4]), ("muxes", MUX, h[8]),
                         ("pieces", PIECE, h[5]), ("convs", CONV, h[6]),
                         ("choices", fc, h[10])):
        L[name] = o
        o += struct.calcsize(fmt) * n
    L["strings"] = o
    return L


def signal_names(table):
    """DBC signal name of every table signal, in index order."""
    L = layout(table)
    size = struct.calcsize(L["SIG"])
    out = []
    for k in range(L["nsig"]):
        off = L["strings"] + struct.unpack_from(L["SIG"], table, L["sigs"] + k * size)[9]
        out.append(table[off:table.index(b"\0", off)].decode("utf-8"))
    return out


def _dedup_messages(db):
    """The messages cantools' get_message_by_frame_id() returns (last definition wins)."""
    seen = {}
    for m in db.messages:
        seen[(m.is_extended_frame, m.frame_id)] = m
    return list(seen.values())


def compile_dbc(db, bus=0, skip_unsupported=False, warn=None):
    """All messages and signals of a DBC (path or cantools Database) -> table bytes.
    skip_unsupported: drop messages the decoder cannot represent (with a warning)
    instead of raising CompileError."""
    if isinstance(db, str):
        db = load_dbc(db, warn)
    entries, msgs = [], []
    for m in _dedup_messages(db):
        # flaws of the DBC itself, where cantools gives no value either: skipped, not errors
        why = undecodable(m)
        if why:
            if warn:
                warn("skipped: %s: cantools cannot decode it either" % why)
            continue
        lost = orphans(m)
        if lost and warn:
            warn("%s: signals %s skipped: multiplexed by %s, which is no multiplexer of the "
                 "message (cantools never decodes them)" % (
                     _where(m), ", ".join(s.name for s in lost),
                     ", ".join(sorted(set(s.multiplexer_signal for s in lost)))))
        sigs = [s for s in m.signals if s not in lost]
        try:
            mux_info(m)
            for s in sigs:
                check_signal(m, s)
        except CompileError as e:
            if not skip_unsupported:
                raise
            if warn:
                warn("skipped: %s" % e)
            continue
        msgs.append((bus, m))
        entries.extend(Entry(bus, m, s) for s in sigs)
    return build(entries, warn, msgs)


def bus_index(name):
    """'can0'..'can3' -> 0..3."""
    m = re.fullmatch(r"can([0-3])", str(name))
    if not m:
        raise CompileError('bus name "%s": expected can0..can3' % name)
    return int(m.group(1))


def load_mapping(path):
    """Read and minimally validate a vehicle mapping file -> dict."""
    try:
        with open(path, encoding="utf-8") as f:
            mp = json.load(f)
    except (OSError, ValueError) as e:
        raise CompileError("%s: cannot read mapping: %s" % (path, e))
    if not isinstance(mp, dict) or not isinstance(mp.get("buses"), dict) \
            or not isinstance(mp.get("metrics"), dict):
        raise CompileError('%s: mapping needs "buses" and "metrics" objects' % path)
    return mp


def mapping_entries(path, warn=None, dbs=None):
    """Vehicle mapping file -> (entries, {bus name: (index, dbc path)})."""
    mp = load_mapping(path)
    base = os.path.dirname(os.path.abspath(path))
    buses, dbs = {}, {} if dbs is None else dbs
    for name, dbc in mp["buses"].items():
        p = dbc if os.path.isabs(dbc) else os.path.join(base, dbc)
        buses[name] = (bus_index(name), p)
        if p not in dbs:
            dbs[p] = load_dbc(p, warn)
    entries = []
    for metric, src in mp["metrics"].items():
        where = '%s: metric "%s"' % (path, metric)
        if not isinstance(src, dict):
            raise CompileError("%s: entry must be an object" % where)
        bus = src.get("bus")
        if bus is None:
            if len(buses) != 1:
                raise CompileError('%s: "bus" is required (several buses)' % where)
            bus = next(iter(buses))
        if bus not in buses:
            raise CompileError('%s: unknown bus "%s"' % (where, bus))
        idx, p = buses[bus]
        db = dbs[p]
        mref, sname = src.get("message"), src.get("signal")
        if isinstance(mref, int) and not isinstance(mref, bool):
            hits = [m for m in db.messages if m.frame_id == mref & 0x1FFFFFFF
                    and (m.is_extended_frame or not mref & 0x80000000)]
            msg = hits[-1] if len(hits) == 1 else None
            if len(hits) > 1:
                raise CompileError("%s: frame id %d is both a standard and an extended message "
                                   "in %s: use the message name" % (where, mref, p))
        else:
            try:
                msg = db.get_message_by_name(mref)
            except (KeyError, TypeError):
                msg = None
        if msg is None:
            raise CompileError('%s: unknown message "%s" in %s' % (where, mref, p))
        try:
            sig = msg.get_signal_by_name(sname)
        except KeyError:
            raise CompileError('%s: unknown signal "%s" in message "%s"'
                               % (where, sname, msg.name)) from None
        factor, add = src.get("factor", 1), src.get("add", 0)
        for v in (factor, add):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CompileError("%s: factor/add must be numbers" % where)
        unit = src.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise CompileError('%s: "unit" must be a string' % where)
        entries.append(Entry(idx, msg, sig, metric, unit, factor, add))
    return entries, buses


def compile_mapping(path, warn=None):
    """Vehicle mapping file -> table bytes (only the mapped signals)."""
    entries, _ = mapping_entries(path, warn)
    return build(entries, warn)


def to_module(table, source=""):
    """Freezable module text: TABLE = b"..." (load with Decoder(mod.TABLE))."""
    lines = ['"""Decode table%s (generated by tools/dbc2table.py; do not edit)."""'
             % (" for " + source if source else ""), "TABLE = ("]
    for i in range(0, len(table), 64):
        lines.append("    %r" % bytes(table[i:i + 64]))
    lines.append(")")
    return "\n".join(lines) + "\n"


def summary(table):
    """Counts and size of a table."""
    L = layout(table)
    return {"messages": L["nmsg"], "signals": L["nsig"], "pieces": L["npiece"],
            "conversions": L["nconv"], "choices": L["nchoice"], "strings": L["nstr"],
            "bytes": len(table)}


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dbc", help="compile every message of this DBC")
    src.add_argument("--map", help="compile the signals of this vehicle mapping (JSON)")
    ap.add_argument("--bus", type=int, default=0, help="bus index for --dbc (0..3)")
    ap.add_argument("-o", "--out", help="write the binary table here")
    ap.add_argument("--py", help="write a freezable module (TABLE = b'...') here")
    ap.add_argument("--skip-unsupported", action="store_true",
                    help="--dbc: drop messages the decoder cannot represent (warn)")
    a = ap.parse_args(argv)

    def warn(msg):
        print("dbc2table: warning: " + msg, file=sys.stderr)
    try:
        if a.dbc:
            table = compile_dbc(a.dbc, a.bus, a.skip_unsupported, warn)
        else:
            table = compile_mapping(a.map, warn)
    except CompileError as e:
        print("dbc2table: error: %s" % e, file=sys.stderr)
        return 2
    if a.out:
        with open(a.out, "wb") as f:
            f.write(table)
    if a.py:
        with open(a.py, "w") as f:
            f.write(to_module(table, os.path.basename(a.dbc or a.map)))
    print("dbc2table: %s" % json.dumps(summary(table)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
