"""Property tests: random signal layouts and payloads, device decoder == cantools.

Each hypothesis example is a whole random DBC (several messages) plus many frames, decoded
in ONE micropython run, so hundreds of layouts are checked in a few seconds."""
import cantools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_decoder_features import assert_matches, dbc_text

SCALES = ["1", "1.0", "2", "2.0", "0.5", "0.1", "-1", "0.001", "1e-3", "10", "0.0625"]
OFFSETS = ["0", "0.0", "-40", "1.5", "100", "-0.25", "7"]


def bits_of(order, start, length):
    if order == 1:
        return set(range(start, start + length))
    m = 8 * (start // 8) + 7 - start % 8
    return {8 * (n // 8) + 7 - n % 8 for n in range(m, m + length)}


@st.composite
def signal(draw, nbytes, used, name, mux=""):
    """One SG_ line that fits in nbytes and does not touch `used` (or None)."""
    total = 8 * nbytes
    order = draw(st.sampled_from([0, 1]))
    is_float = draw(st.integers(0, 9)) == 0 and total >= 32
    if is_float:
        length = draw(st.sampled_from([32, 64] if total >= 64 else [32]))
    else:
        length = draw(st.one_of(st.integers(1, 16), st.integers(1, min(64, total))))
    length = min(length, total)
    if order == 1:
        start = draw(st.integers(0, total - length))
    else:
        msb = draw(st.integers(0, total - length))          # network bit of the MSB
        start = 8 * (msb // 8) + 7 - msb % 8
    b = bits_of(order, start, length)
    if b & used:
        return None
    used |= b
    signed = draw(st.booleans())
    scale = "1" if is_float and draw(st.booleans()) else draw(st.sampled_from(SCALES))
    offset = draw(st.sampled_from(OFFSETS))
    line = "%s %s: %d|%d@%d%s (%s,%s) [0|0] \"\" N" % (
        name, mux + " " if mux else "", start, length, order, "-" if signed else "+", scale, offset)
    choices = None
    if not is_float and draw(st.integers(0, 3)) == 0:
        lo, hi = (-(1 << (length - 1)), (1 << (length - 1)) - 1) if signed else (0, (1 << length) - 1)
        vals = draw(st.lists(st.integers(max(lo, -8), min(hi, 8)), min_size=1, max_size=4,
                             unique=True))
        choices = {v: "L%d_%s" % (v & 0xFFFF, name) for v in vals}
    return line, is_float, length, choices


@st.composite
def database(draw, mux=False):
    nmsg = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(1, 0x7FF), min_size=nmsg, max_size=nmsg, unique=True))
    msgs, valtypes, vals = [], [], []
    for i, fid in enumerate(ids):
        ext = draw(st.booleans())
        dbc_id = (fid * 7919 + 0x100000) | 0x80000000 if ext else fid
        nbytes = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 12, 16]))
        used = set()
        lines = []

        def add(name, muxtag, used_set):
            s = draw(signal(nbytes, used_set, name, muxtag))
            if s is None:
                return False
            line, is_float, length, choices = s
            lines.append(line)
            if is_float:
                valtypes.append((dbc_id, name, 1 if length == 32 else 2))
            if choices:
                vals.append((dbc_id, name, choices))
            return True
        if mux:
            mlen = draw(st.integers(1, min(4, 8 * nbytes)))
            mo = draw(st.sampled_from([0, 1]))
            mstart = draw(st.integers(0, 8 * nbytes - mlen))
            if mo == 0:
                mstart = 8 * (mstart // 8) + 7 - mstart % 8
            used |= bits_of(mo, mstart, mlen)
            lines.append("MUX M : %d|%d@%d+ (1,0) [0|0] \"\" N" % (mstart, mlen, mo))
            for j in range(draw(st.integers(0, 2))):
                add("R%d" % j, "", used)
            for mid in draw(st.lists(st.integers(0, (1 << mlen) - 1), min_size=1, max_size=4,
                                     unique=True)):
                branch = set(used)
                for j in range(draw(st.integers(1, 3))):
                    add("X%d_%d" % (mid, j), "m%d" % mid, branch)
        else:
            for j in range(draw(st.integers(1, 6))):
                add("S%d" % j, "", used)
        msgs.append((dbc_id, "MSG%d" % i, nbytes, lines))
    text = dbc_text(msgs, valtypes)
    for fid, name, ch in vals:
        text += "VAL_ %d %s %s ;\n" % (fid, name, " ".join('%d "%s"' % kv for kv in ch.items()))
    return text


@st.composite
def payloads(draw, db):
    frames = []
    for m in db.messages:
        for _ in range(draw(st.integers(1, 12))):
            n = draw(st.sampled_from([m.length] * 4 + [0, max(0, m.length - 1), m.length // 2,
                                                        m.length + 2]))
            data = draw(st.binary(min_size=n, max_size=n))
            frames.append((0.0, "can0", m.frame_id, m.is_extended_frame, data))
    draw(st.randoms()).shuffle(frames)
    return frames


def check(data, mux):
    text = data.draw(database(mux=mux))
    db = cantools.database.load_string(text, "dbc", strict=False)
    frames = data.draw(payloads(db))
    assert_matches(db, frames)
    assert_matches(db, frames, raw=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.data())
def test_random_layouts_and_payloads_match_cantools(data):
    check(data, mux=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.data())
def test_random_multiplexed_layouts_match_cantools(data):
    check(data, mux=True)
