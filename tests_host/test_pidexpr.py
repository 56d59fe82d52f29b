"""PID expressions (WiCAN and ABRP dialects): random expression trees rendered as text, compiled
by tools/pidexpr.py and run by the device's evaluator (lib/ovms/poll/expr.py on the micropython
binary) against random answers, compared with an evaluation of the same trees written here
(its own precedence rules, its own ISO-TP framing of the answer for WiCAN's byte numbering)."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pidexpr
from util import LIB, run_mpy

WICAN_PREC = {"|": 1, "^": 1, "&": 2, "<<": 3, ">>": 3, "+": 4, "-": 4, "*": 5, "/": 5}
C_PREC = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7, "<=": 7,
          ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}


# ---- the reference: frames as a CAN bus carries them, values as C computes them -------------

def frames(payload):
    """The answer as its CAN frames' data bytes (ISO-TP, no padding): PCI positions as None."""
    n = len(payload)
    if n <= 7:
        return [None] + list(payload)
    out = [None, None] + list(payload[:6])
    rest = payload[6:]
    while rest:
        out += [None] + list(rest[:7])
        rest = rest[7:]
    return out


def ref(t, payload, off, dialect):
    raw = frames(payload)

    def byte(i):
        if dialect == "wican":
            return raw[i] if i < len(raw) else None
        return payload[off + i] if off + i < len(payload) else None

    def ev(t):
        k = t[0]
        if k == "num":
            return t[1]
        if k == "byte":
            return byte(t[1])
        if k == "sbyte":
            v = byte(t[1])
            return None if v is None else (v ^ 0x80) - 0x80
        if k == "bit":
            v = byte(t[1])
            return None if v is None else 1 if v & (1 << t[2]) else 0
        if k == "range":
            vs = [byte(i) for i in range(t[1], t[2] + 1)]
            if None in vs:
                return None
            r = int.from_bytes(bytes(vs), "big", signed=t[3])
            return r
        if k == "un":
            a = ev(t[2])
            if a is None:
                return None
            return {"neg": lambda: -a, "!": lambda: 0 if a else 1, "abs": lambda: abs(a),
                    "signed": lambda: ((int(a) & 0xFF) ^ 0x80) - 0x80}[t[1]]()
        if k == "cond":
            c = ev(t[1])
            return None if c is None else ev(t[2]) if c else ev(t[3])
        a, b = ev(t[2]), ev(t[3])
        if a is None or b is None:
            return None
        op = t[1]
        if op == "/":
            return None if b == 0 else a / b
        if op in ("&", "|", "^", "<<", ">>", "%"):
            a, b = math.trunc(a), math.trunc(b)
            if op in ("<<", ">>") and not 0 <= b < 64:
                return None
            if op == "%":
                return None if b == 0 else int(math.fmod(a, b))
            return {"&": a & b, "|": a | b, "^": a ^ b}.get(op) if op in "&|^" else \
                (a << b if op == "<<" else a >> b)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "<": lambda: int(a < b), ">": lambda: int(a > b), "<=": lambda: int(a <= b),
                ">=": lambda: int(a >= b), "==": lambda: int(a == b), "!=": lambda: int(a != b),
                "&&": lambda: int(bool(a and b)), "||": lambda: int(bool(a or b)),
                "min": lambda: min(a, b), "max": lambda: max(a, b)}[op]()
    return ev(t)


# ---- random trees and their text ------------------------------------------------------------

def letters(i):
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def render(t, dialect, prec_ctx=0, right=False):
    P = WICAN_PREC if dialect == "wican" else C_PREC
    k = t[0]
    if k == "num":
        return repr(t[1])
    if k in ("byte", "sbyte", "bit", "range"):
        if dialect == "wican":
            return {"byte": "B%d", "sbyte": "S%d"}[k] % t[1] if k in ("byte", "sbyte") else \
                "B%d:%d" % (t[1], t[2]) if k == "bit" else \
                "[%s%d:%s%d]" % ("S" if t[3] else "B", t[1], "S" if t[3] else "B", t[2])
        name = letters(t[1]) if t[1] % 3 else letters(t[1]).lower()
        return {"byte": name, "sbyte": "Signed(%s)" % name, "bit": "{%s:%d}" % (name, t[2] if k == "bit" else 0)}[k]
    if k == "un":
        inner = render(t[2], dialect, 99)
        return {"neg": "-%s", "!": "!%s", "abs": "abs(%s)", "signed": "Signed(%s)"}[t[1]] % (
            inner if t[1] in ("neg", "!") else render(t[2], dialect))
    if k == "cond":
        s = "%s ? %s : %s" % (render(t[1], dialect, 1), render(t[2], dialect), render(t[3], dialect))
        return "(%s)" % s if prec_ctx else s
    op = t[1]
    if op in ("min", "max"):
        return "%s(%s, %s)" % (op, render(t[2], dialect), render(t[3], dialect))
    p = P[op]
    s = "%s %s %s" % (render(t[2], dialect, p), op, render(t[3], dialect, p, True))
    return "(%s)" % s if p < prec_ctx or (right and p == prec_ctx) else s


def trees(dialect):
    idx = st.integers(0, 70)
    nums = st.one_of(st.integers(0, 70000), st.sampled_from([0.5, 0.1, 2.5, 0.02, 1e-3, 16383.75]))
    leaves = [st.tuples(st.just("num"), nums), st.tuples(st.just("byte"), idx),
              st.tuples(st.just("bit"), idx, st.integers(0, 7))]
    if dialect == "wican":
        leaves += [st.tuples(st.just("sbyte"), idx),
                   idx.flatmap(lambda i: st.tuples(st.just("range"), st.just(i), st.integers(i, i + 7),
                                                   st.booleans()))]
        ops = list(WICAN_PREC)
    else:
        ops = list(C_PREC) + ["min", "max"]

    def extend(ch):
        alts = [st.tuples(st.just("bin"), st.sampled_from(ops), ch, ch)]
        if dialect == "abrp":
            alts += [st.tuples(st.just("un"), st.sampled_from(["neg", "!", "abs", "signed"]), ch),
                     st.tuples(st.just("cond"), ch, ch, ch)]
        return st.one_of(alts)
    return st.recursive(st.one_of(leaves), extend, max_leaves=6)


DEVICE = """
import json
from ovms.poll import expr
for code, consts, payload, off, raw in json.load(open(%r)):
    v = expr.run(bytes.fromhex(code), tuple(consts), bytes.fromhex(payload), off, len(payload) // 2, raw)
    print(repr(v))
"""


def device_values(tmp_path, cases):
    p = tmp_path / "cases.json"
    p.write_text(json.dumps(cases))
    out = run_mpy(DEVICE % str(p), heap="4M", path=(LIB,)).stdout.split("\n")
    return [None if x == "None" else float(x) for x in out[:len(cases)]]


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("dialect", ["wican", "abrp"])
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_device_evaluator_matches_the_reference(tmp_path, dialect, data):
    cases, want, texts = [], [], []
    for _ in range(150):
        t = data.draw(trees(dialect))
        payload = bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=70)))
        off = data.draw(st.integers(1, 3))
        text = render(t, dialect)
        try:
            code, consts = pidexpr.compile_expr(text, dialect)
        except pidexpr.ExprError as e:
            assert "too deep" in str(e) or "too long" in str(e), (text, e)
            continue
        cases.append([code.hex(), list(consts), payload.hex(), off, dialect == "wican"])
        want.append(ref(t, payload, off, dialect))
        texts.append(text)
        # the host evaluator (pids.py check) agrees with the reference too
        host = pidexpr.evaluate(pidexpr.parse(text, dialect), payload, off, dialect)
        assert close(None if host is None else float(host), None if want[-1] is None else float(want[-1])), (text, payload.hex(), host, want[-1])
    got = device_values(tmp_path, cases)
    for text, c, g, w in zip(texts, cases, got, want):
        assert close(g, None if w is None else float(w)), (text, c[2], g, w)


REAL = [
    # WiCAN (a Kona/Niro BMS 22 0101 answer: 62 01 01 + data; bytes counted in CAN frames)
    ("wican", "B10/2", 0x48 / 2),
    ("wican", "[S17:S18]/10", -1.3),
    ("wican", "[B19:B20]/10", 356.7),
    ("wican", "([B49:B50]*65536 + [B51:B52])/10", (0x0001 * 65536 + 0x2345) / 10),
    ("wican", "B15:7", 1),
    ("wican", "B38*0.1", 0x7B * 0.1),
    # ABRP on the same answer (letters count after 62 01 01)
    ("abrp", "e/2", 0x48 / 2),
    ("abrp", "((Signed(K)*256)+L)/10", -1.3),
    ("abrp", "((M<<8)+N)/10", 356.7),
    ("abrp", "Int16(M,N)/10", 356.7),
    ("abrp", "(!{j:2}&&{j:7})", 1),
]


def kona_answer():
    d = bytearray(60)
    d[4] = 0x48                         # SOC 36 %
    d[9] = 0x80                         # relay bit 7 (B15, letter J)
    d[10:12] = (-13).to_bytes(2, "big", signed=True)
    d[12:14] = (3567).to_bytes(2, "big")
    d[29] = 0x7B
    d[38:42] = bytes.fromhex("00012345")
    return b"\x62\x01\x01" + bytes(d)


@pytest.mark.parametrize("dialect,text,value", REAL)
def test_real_profile_expressions(tmp_path, dialect, text, value):
    code, consts = pidexpr.compile_expr(text, dialect)
    a = kona_answer()
    assert close(pidexpr.evaluate(pidexpr.parse(text, dialect), a, 3, dialect), value)
    got = device_values(tmp_path, [[code.hex(), list(consts), a.hex(), 3, dialect == "wican"]])
    assert close(got[0], value), (text, got)


@pytest.mark.parametrize("dialect,text,msg", [
    ("wican", "B10/", "ends too early"),
    ("wican", "V*2", "cannot read"),
    ("wican", "[B5:S6]", "mixes B and S"),
    ("wican", "[B9:B2]", "forward"),
    ("abrp", "foo(A)", "unsupported function"),
    ("abrp", "A ? B", "expected ':'"),
    ("abrp", "{A:9}", "bits are 0..7"),
    ("abrp", "(" * 17 + "A" + "+1)" * 17, None),
    ("abrp", "1+(2+(3+(4+(5+(6+(7+(8+(9+(10+(11+(12+(13+(14+(15+(16+(17+A))))))))))))))))", "too deep"),
    ("abrp", "", "empty"),
])
def test_bad_expressions_are_clear_errors(dialect, text, msg):
    if msg is None:
        pidexpr.compile_expr(text, dialect)      # deep parentheses, shallow stack: fine
        return
    with pytest.raises(pidexpr.ExprError, match=msg):
        pidexpr.compile_expr(text, dialect)


def test_device_evaluation_allocates_little(tmp_path):
    """Integer expressions allocate nothing per answer; a division one float (host bytes)."""
    cases = []
    for text in ("([B49:B50]*65536 + [B51:B52])", "B15:7", "[B19:B20]/10"):
        code, consts = pidexpr.compile_expr(text, "wican")
        cases.append((code, consts))
    out = run_mpy("""
import gc
from ovms.poll import expr
buf = bytes(range(64))
def m(f, k):
    f()
    gc.collect()
    i = 0
    a = gc.mem_alloc()
    while i < k:
        f()
        i += 1
    return gc.mem_alloc() - a
for code, consts in %r:
    f = lambda: expr.run(code, consts, buf, 3, 64, True)
    print((m(f, 1000) - m(f, 100)) // 900)
""" % (cases,), heap="256K", path=(LIB,)).stdout.split()
    ints, bit, div = (int(x) for x in out)
    assert ints == 0 and bit == 0, out
    assert div <= 32, out               # one boxed float per answer
