"""The viper hot path with 32-bit machine words (as on the ESP32), emulated on CPython.

Viper ints are 64-bit on x86-64 but 32-bit on the ESP32.  Here lib/ovms/can/decoder.py runs
on CPython with every viper `int` replaced by a type that wraps each result to a signed
32-bit word (ptr32 loads are reinterpreted as signed, stores keep the low 32 bits), and
its output is compared with cantools: any reliance on >32-bit intermediates shows up."""
import importlib.util
import os
import random
import sys
import types

import cantools

import candecode
import dbc2table
from test_decoder_features import cantools_decode, dbc_text, plain, same
from util import LIB, data


def _wrap(v):
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class I32(int):
    """A signed 32-bit machine word: every arithmetic result wraps like a register."""

    def __new__(cls, v=0):
        return int.__new__(cls, _wrap(int(v)))


def _op(name):
    f = getattr(int, name)
    shift = "shift" in name
    rev = name.startswith("__r") and name not in ("__rshift__",)

    def g(a, b):
        if shift:                  # a shift by >= 32 is undefined on a 32-bit CPU
            n = int(a) if rev else int(b)
            assert 0 <= n < 32, "shift by %d" % n
        r = f(int(a), int(b))
        return NotImplemented if r is NotImplemented else I32(r)
    return g


for _n in ("add", "sub", "mul", "lshift", "rshift", "and", "or", "xor"):
    setattr(I32, "__%s__" % _n, _op("__%s__" % _n))
    setattr(I32, "__r%s__" % _n, _op("__r%s__" % _n))
I32.__neg__ = lambda a: I32(-int(a))


class P32:
    """ptr32 over an array: loads give the stored 32 bits, stores keep the low 32 bits."""

    def __init__(self, a):
        self.a = a

    def __getitem__(self, i):
        return self.a[i]

    def __setitem__(self, i, v):
        v = int(v) & 0xFFFFFFFF
        self.a[i] = v if self.a.typecode in "IL" else _wrap(v)


def load_decoder():
    mp = types.ModuleType("micropython")
    mp.const = lambda x: x
    mp.viper = mp.native = lambda f: f
    sys.modules.setdefault("micropython", mp)
    spec = importlib.util.spec_from_file_location("decoder_word32",
                                                  os.path.join(LIB, "ovms", "can", "decoder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = dict(mod.__dict__, int=I32, ptr8=lambda x: x, ptr16=lambda x: x, ptr32=P32)
    mod._run = types.FunctionType(mod._run.__code__, g, "_run")
    return mod


def decode32(table, frames, raw=False):
    mod = load_decoder()
    d = mod.Decoder(table)
    out = []
    for fr in frames:
        d.feed(0, fr[2], fr[3], fr[4], len(fr[4]), 1)
        if d.message >= 0:
            out.append((fr, {d.info(k)[1]: d.raw(k) if raw else d.value(k, True, False)
                             for k in d.touched}))
    return out, d


def check(db, frames):
    table = dbc2table.compile_dbc(db)
    for raw in (False, True):
        want = cantools_decode(db, frames, raw)
        got, _ = decode32(table, frames, raw)
        assert len(got) == len(want)
        for (wf, ws), (gf, gs) in zip(want, got):
            assert gf is wf and set(gs) == set(ws), (wf, ws, gs)
            for k in ws:
                assert same(plain(ws[k]), gs[k]), (wf, k, ws[k], gs[k])


def test_word32_emulation_wraps():
    a = I32(0x7FFFFFFF) + 1
    assert a == -2 ** 31 and isinstance(a, I32)
    assert (I32(1) << 31) << 1 == 0
    assert ((I32(1) << 31) << 1) - 1 == -1                   # the 32-bit mask computation
    try:
        1 << I32(32)
    except AssertionError:
        pass
    else:
        raise AssertionError("shift by 32 not caught")
    assert I32(0xFF) << 25 == _wrap(0xFF << 25)


def test_wide_signals_and_32_bit_pieces_with_32_bit_words(tmp_path):
    msgs = [(0x100, "LE64", 8, ['U64 : 0|64@1+ (1,0) [0|0] "" N']),
            (0x101, "BE64S", 8, ['S64 : 7|64@0- (0.5,-3) [0|0] "" N']),
            (0x102, "ODD", 8, ['A33 : 7|33@1- (1,0) [0|0] "" N', 'B24 : 40|24@1+ (1,0) [0|0] "" N']),
            (0x103, "W32", 8, ['G32 : 1|32@1+ (1,0) [0|0] "" N', 'H31 : 33|31@1- (1,0) [0|0] "" N']),
            (0x104, "BE32", 8, ['I32 : 3|32@0- (0.25,1) [0|0] "" N',
                                'J28 : 36|28@1+ (1,0) [0|0] "" N']),
            (0x105, "MUX32", 8, ['M M : 7|32@0+ (1,0) [0|0] "" N',
                                 'X m5 : 32|16@1+ (1,0) [0|0] "" N',
                                 'Y m2147483647 : 48|16@1- (1,0) [0|0] "" N']),
            (0x106, "F", 8, ['F32 : 0|32@1- (1,0) [0|0] "" N', 'F32B : 39|32@0- (2,0) [0|0] "" N']),
            (0x107, "D", 8, ['D64 : 0|64@1- (1,0) [0|0] "" N'])]
    p = tmp_path / "w.dbc"
    p.write_text(dbc_text(msgs, [(0x106, "F32", 1), (0x106, "F32B", 1), (0x107, "D64", 2)]))
    db = cantools.database.load_file(str(p), strict=False)
    rnd = random.Random(7)
    frames = []
    for m in db.messages:
        for pat in (b"\xff" * 8, b"\x80" * 8, b"\x7f" * 8, b"\x00" * 8, b"\x01" * 8):
            frames.append((0.0, "can0", m.frame_id, False, pat))
        for _ in range(60):
            frames.append((0.0, "can0", m.frame_id, False,
                           bytes(rnd.getrandbits(8) for _ in range(rnd.choice([8, 8, 5, 3])))))
    for mux in (5, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF):
        frames.append((0.0, "can0", 0x105, False, mux.to_bytes(4, "big") + b"\x81\x82\x83\x84"))
    check(db, frames)
    got, _ = decode32(dbc2table.compile_dbc(db), frames[-4:])
    assert [sorted(s) for _, s in got] == [["M", "X"], ["M", "Y"], ["M"], ["M"]]


def test_real_log_with_32_bit_words():
    r = "toyota_rav4_comma2k19/"
    log = data(r + "logs/comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log")
    db = dbc2table.load_dbc(data(r + "dbc/toyota_adas.dbc"))
    frames = candecode.read_log(log, "can1")[:2500]
    check(db, frames)
    db = dbc2table.load_dbc(data("kona_ev/dbc/pcan.dbc"))   # 32-bit VCU_109 signal
    frames = candecode.read_log(data("kona_ev/logs/230112-7-2019-pcan-ccan-power-off-on-ready-off.log"),
                                "can0")[:2500]
    check(db, frames)
