"""Property test: >= 10,000 random and adversarial command lines through ovms.shell in ONE
micropython process. Every reply is a non-empty bounded str, nothing escapes, secrets never
appear, and rejected commands change no state (config, metrics, secure flags, CAN, hooks)."""
import json
import struct

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from test_shell import mlib, sh  # noqa: F401  (mlib is a fixture)

N = 10000
SECRETS = ("Zq9!pwMod", "Wf7#pwNet")

WORDS = ["metrics", "met", "m", "list", "l", "get", "g", "set", "s", "config", "conf", "c", "rm", "stat", "st",
         "can", "send", "status", "server", "v3", "update", "all", "modified", "module", "mod", "info", "memory",
         "tasks", "reset", "notify", "raise", "info", "alert", "event", "enable", "en", "disable", "help", "?",
         "lock", "unlock", "climatecontrol", "cl", "on", "off", "charge", "start", "stop", "limit", "v.b.soc",
         "v.b", "v.c.mode", "v.e.locked", "v.b.c.voltage", "password", "vehicle", "id", "name", "server.v3",
         "port", "tls", "wifi.ssid", "usr", "*", "7df", "0x18DAF110", "02010d", "1", "2", "80", "101", "-1",
         "yes", "no", "1e308", "nan", "-0", "0" * 40, "shell.readonly", "shell.timeout", "*"]
SPICE = ['"', '\\"', "\\", "'", "?", "??", '""', "\t", "%s", "%d", "{}", "\x00", "\x1b[2J", "\r", "\n", "\u2603",
         "\u00e9", "\ufeff", "\U0001f697", "\ud800", " " * 30]


def _token():
    return st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS).map(lambda w: w[: max(1, len(w) // 2)]),
                     st.sampled_from(SPICE), st.text(max_size=12),
                     st.lists(st.sampled_from("0123456789abcdefABCDEFx:"), max_size=20).map("".join),
                     st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(repr))


VALID = ["metrics list", "metrics list v.b", "metrics get v.b.soc", "metrics set v.b.soc", "metrics set v.e.locked",
         "stat", "help", "config list", "config list password", "config get vehicle id", "config set vehicle id",
         "config set usr", "config set server.v3 port", "config rm usr", "config get password module", "module info",
         "module tasks", "can status", "can send 7df", "lock", "unlock", "climatecontrol on", "charge limit",
         "charge start", "event raise", "notify raise info", "enable", "disable", "server v3", "server v3 update all"]
_valid = st.tuples(st.sampled_from(VALID), st.lists(_token(), max_size=3)).map(lambda t: " ".join([t[0]] + t[1]))
_composed = st.tuples(st.lists(_token(), max_size=8), st.sampled_from([" ", "  ", "\t", "", " \" "])) \
    .map(lambda t: t[1].join(t[0]))
_text_line = st.one_of(
    _valid, _valid, _valid, _composed, _composed, _composed,
    st.text(max_size=60),
    st.tuples(st.text(min_size=1, max_size=8), st.integers(100, 160)).map(lambda t: t[0] * t[1]),
    st.sampled_from(["", " ", "?", "help", "x" * 1024, "x" * 1025, '"' * 7, "\\" * 9]),
)


def _encode(s):
    return s.encode("utf-8", "surrogatepass")   # lone surrogates -> invalid UTF-8 on purpose


RECORD = st.tuples(
    st.integers(0, 2),                      # session: 0 plain, 1 secure, 2 MQTT read-only
    st.booleans(),                          # deliver as bytes (else str when valid UTF-8)
    st.one_of(_text_line.map(_encode), _text_line.map(_encode), st.binary(max_size=80)))

LINES = []


@settings(max_examples=N // 50 + 10, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(st.lists(RECORD, min_size=50, max_size=50))
def _collect(recs):   # batches of 50: much less per-example overhead than one line per example
    LINES.extend(recs)


DEVICE = r"""
import gc
from ovms import shell
config.set("password", "module", SECRETS[0])
config.set("wifi.ssid", "Home", SECRETS[1])
config.set("server.v3", "shell.readonly", "yes")
class Count:                    # records how often a hook ran, without growing the heap
    n = 0
    def append(self, x):
        self.n += 1
EV = Count()
FR = Count()
V.calls = Count()
shell.hook("event", lambda n: EV.append(n))
shell.hook("notify", lambda t, s, x: EV.append(t))
shell.hook("reset", lambda: EV.append("reset"))
shell.hook("can_send", lambda bus, fid, ext, data: FR.append(fid))
shell.hook("can_status", lambda: {"state": "running"})
plain = shell.Session("fuzz-plain")
sec = shell.Session("fuzz-secure")
ro = shell.session_for("fuzz-ro")
SS = (plain, sec, ro)
REJ = ("Error", "Unrecognised command", "Usage:")
def state():
    return (config.generation(), M.count(), [s.secure for s in SS], FR.n, EV.n)
def changed_metrics():      # metric change bits of the (otherwise unused) SHELL consumer
    k = 0
    while M.next_modified(M.SHELL, 0) >= 0:
        k += 1
    return k
changed_metrics()
fails = []
kinds = {}
n = 0
f = open(PATH, "rb")
H = bytearray(6)
BUF = bytearray(6000)      # one buffer: the harness must not fragment the heap itself
MV = memoryview(BUF)
while True:
    if f.readinto(H) != 6:
        break
    sid = H[0]
    asbytes = H[1]
    ln = H[2] | H[3] << 8 | H[4] << 16 | H[5] << 24
    b = MV[:ln]
    f.readinto(b)
    line = b                  # a memoryview, like an MQTT payload buffer
    if not asbytes:
        try:
            line = str(b, "utf-8")
        except Exception:
            pass
    CLOCK[0] += 1000          # one second per command: wrong-password lock-outs pass
    if n % 50 == 0:
        sec.secure = True     # the fuzz may have disabled it
    s = SS[sid]
    before = state()
    changed_metrics()
    try:
        r = shell.run(line, s)
    except BaseException as e:
        fails.append(["raised", repr(bytes(b)), repr(e)])
        n += 1
        continue
    n += 1
    if not isinstance(r, str) or not r:
        fails.append(["empty or not str", repr(bytes(b)), repr(r)])
        continue
    if len(r) > s.max_out:
        fails.append(["too long", repr(bytes(b)), len(r)])
    for x in SECRETS:
        if x in r:
            fails.append(["secret shown", repr(bytes(b)), r[:200]])
    k = "rejected" if r.startswith(REJ) else "ok"
    kinds[k] = kinds.get(k, 0) + 1
    if k == "rejected":
        after = state()
        if after != before or changed_metrics():
            fails.append(["state changed by a rejected command", repr(bytes(b)), r[:200], repr(before), repr(after)])
    if len(fails) > 20:
        break
line = b = r = None
gc.collect()
for x in fails:
    out(x)
out([n, kinds, len(fails), gc.mem_free(), config.get("password", "module") == SECRETS[0], FR.n, EV.n, V.calls.n])
"""


def test_fuzz_10000_lines_one_process(mlib, tmp_path):  # noqa: F811
    LINES.clear()
    _collect()
    assert len(LINES) >= N
    path = tmp_path / "lines.bin"
    with open(path, "wb") as f:
        for sid, asbytes, b in LINES:
            assert len(b) <= 6000
            f.write(bytes([sid, int(asbytes)]) + struct.pack("<I", len(b)) + b)
    # 104K: the shell's code comes from .mpy files here and sits in the heap (frozen on a
    # module); the harness's own 6 KB record buffer needs one contiguous block besides
    o = sh(mlib, tmp_path, "PATH = %r\nSECRETS = %r\n" % (str(path), SECRETS) + DEVICE, heap="104K")
    n, kinds, nfails, free, pw_kept, frames, events, vcalls = o[-1]
    fails = o[:-1]
    print("fuzz: %d lines, %r, heap free at end %d, %d frames sent, %d events, %d vehicle calls"
          % (n, kinds, free, frames, events, vcalls))
    assert fails == [] and nfails == 0, json.dumps(fails, indent=1)[:6000]
    assert n == len(LINES)
    # not vacuous: plenty of both accepted and rejected commands went through
    assert kinds["ok"] > 800 and kinds["rejected"] > 3000, kinds
    assert pw_kept


def test_state_changing_commands_are_caught_by_the_checker(mlib, tmp_path):  # noqa: F811
    """The fuzz checker sees state changes: accepted secure commands do change what it watches."""
    o = sh(mlib, tmp_path, """
shell.local.secure = True
g = config.generation()
out([R("config set vehicle id X"), config.generation() != g, R("lock"), len(FRAMES) > 0])
""")
    assert o[0] == ["Parameter has been set.", True, "Vehicle locked", True]
