"""Command shell (ovms.shell and its command modules) on the micropython binary."""
import json
import os
import subprocess

import pytest

from util import LIB, MICROPYTHON, compiled_lib, run_mpy

PRELUDE = r'''
import json, sys, os
import ovms
from ovms import shell
from ovms import metrics as M
M.set("v.p.odometer", 12345.6)
M._up_s += 121                       # the odometer is now older than its 120 s stale time
for n, v in (("v.b.soc", 85.5), ("v.b.voltage", 380.25), ("v.b.c.voltage", [3.91, 3.92]),
             ("v.b.range.ideal", 200.4), ("v.b.range.est", 180.0), ("v.c.charging", False),
             ("v.c.mode", "standard"), ("v.c.state", "done"), ("v.e.locked", True), ("v.type", "NL")):
    M.set(n, v)
M.define("xnl.v.b.soc.nominal", "f", "%")
from ovms import config
config.init(STORE)
CLOCK = [1000000]
shell._ms = lambda: CLOCK[0]
FRAMES = []
def can_send(bus, fid, ext, data):
    FRAMES.append([bus, fid, ext, "".join(["%02x" % b for b in data])])
    return CAN_OK[0]
CAN_OK = [True]
class Vehicle:
    def __init__(self):
        self.calls = []
    def command_frames(self, name, args):
        self.calls.append([name, args])
        if name == "lock":
            return [(2, 0x60D, False, b"\x01\x02"), (2, 0x18DAF110, True, bytes([0x30]))]
        if name == "climatecontrol.on":
            return [(1, 0x56E, False, [0x4E, 0x08])]
        if name == "charge.limit":
            if args[0] < 50:
                raise ValueError("Charge limit below 50% not supported by this vehicle")
            return [(1, 0x1F2, False, bytes([args[0]]))]
        if name == "charge.start":
            return [(9, 0x1F2, False, b"")]      # malformed: no bus 9
        return None
V = Vehicle()
shell.hook("can_send", can_send)
shell.hook("vehicle", lambda: V)
def out(x):
    print("@" + json.dumps(x))
R = shell.run
'''


OUT = 'import json\ndef out(x):\n    print("@" + json.dumps(x))\n'


@pytest.fixture(scope="module")
def mlib():
    """lib/ compiled to .mpy (native code included) as it is deployed: no compile-time heap peaks."""
    return compiled_lib()


def sh(mlib, tmp_path, code, heap="100K", prelude=True):
    """Run code after PRELUDE (shell, metrics with values, config on tmp_path, fake CAN + vehicle);
    returns the list of out(x) values."""
    pre = "STORE = %r\n" % str(tmp_path) + (PRELUDE if prelude else OUT)
    r = run_mpy(pre + code, heap=heap, path=(mlib,))
    return [json.loads(x[1:]) for x in r.stdout.splitlines() if x.startswith("@")]


def line(name, title):
    return "%-20.20s %s" % (name, title)


# ---- tree, prefixes, help, usage ------------------------------------------------------------

def test_help_lists_children_like_ovms(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
for c in ("help", "?", "metrics ?", "metrics?", "met ?", "help metrics", "metrics list ?", "metrics list?",
          "server v3 ?", "help nosuch"):
    out(R(c))
""")
    top = o[0].split("\n")
    assert line("metrics", "Metrics framework") in top
    assert line("enable", "Enter secure mode (password module)") in top
    assert line("climatecontrol", "Climate control") in top
    assert top == sorted(top) and len(top) >= 15
    assert o[1] == o[0]
    assert o[2] == ("metrics: Metrics framework\n" + line("get", "Show one metric value") + "\n"
                    + line("list", "Show metrics with values: name [age, S = stale] value (-a: all)") + "\n"
                    + line("set", "Set a metric value"))
    assert o[3] == o[2] and o[4] == o[2] and o[5] == o[2]
    assert o[6] == ("metrics list: Show metrics with values: name [age, S = stale] value (-a: all)\n"
                    "Usage: metrics list [-a] [<filter>]")
    assert o[7] == o[6]
    assert line("status", "Connection state") in o[8] and line("update", "Publish metrics now") in o[8]
    assert o[9] == "Unrecognised command"


def test_prefixes_usage_and_unknown(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
for c in ("met l v.b.soc", "metrics list v.b.soc", "METRICS LIST v.b.soc", "m", "c l", "metrics", "metrics get",
          "metrics get a b", "met g v.b.soc", "foo", "foo bar", "metrics foo", "server v3 update", "  stat  ",
          "\\tstat", "climatecontrol", "climatecontrol maybe", "disable now"):
    out(R(c))
shell.local.secure = True
out(R("charge limit"))
""")
    assert o[0] == o[1] == o[2]
    assert o[0] == "%-40s [%6ds ] %s" % ("v.b.soc", 0, "85.5%")
    assert o[3] == "Error: Ambiguous command (metrics, module)"
    assert o[4] == "Error: Ambiguous command (can, charge, climatecontrol, config)"
    assert o[5] == "Usage: metrics get|list|set"
    assert o[6] == "Usage: metrics get <metric>"
    assert o[7] == "Usage: metrics get <metric>"
    assert o[8] == "85.5%"
    assert o[9] == "Unrecognised command" and o[10] == "Unrecognised command"
    assert o[11] == "Unrecognised command\nUsage: metrics get|list|set"
    assert o[12] == "Usage: server v3 update all|modified"
    assert o[13].startswith("Not charging") and o[14] == o[13]
    assert o[15] == "Usage: climatecontrol off|on"
    assert o[16] == "Unrecognised command\nUsage: climatecontrol off|on"
    assert o[17] == "Usage: disable"
    assert o[18] == "Usage: charge limit <soc>"


def test_register_custom_commands_and_quoting(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
shell.register("usr", "User commands", None)
shell.register("usr echo", "Echo the words", lambda s, a: json.dumps(a), "<word>...", 1, -1, False)
shell.register("usr two", "Exactly two", lambda s, a: "ok " + "+".join(a), "<a> <b>", 2, 2, False)
shell.register("usr none", "Returns nothing", lambda s, a: None, "", 0, 0, False)
shell.register("usr boom", "Raises", lambda s, a: 1 // 0, "", 0, 0, False)
shell.register("usr big", "Huge output", lambda s, a: "x" * 3000, "", 0, 0, False)
for c in ('usr echo a "b c"  d', 'usr echo "" x', 'usr echo "say \\\\"hi\\\\"" \\\\n', 'usr echo ab"c d"e',
          'usr echo "unterminated', 'usr echo "\\u00e9t\\u00e9 \\u2603"', "usr two a", "usr two a b",
          "usr two a b c", "usr none", "usr boom", "usr ?", "usr echo ?"):
    out(R(c))
out(R("usr big", shell.Session(max_out=1000)))
out([shell.MAX_OUT, shell.Session().max_out, shell.local.max_out])
""")
    assert json.loads(o[0]) == ["a", "b c", "d"]
    assert json.loads(o[1]) == ["", "x"]
    assert json.loads(o[2]) == ['say "hi"', "\\n"]
    assert json.loads(o[3]) == ["abc de"]
    assert o[4] == "Error: Unterminated quote"
    assert json.loads(o[5]) == ["\u00e9t\u00e9 \u2603"]
    assert o[6] == "Usage: usr two <a> <b>"
    assert o[7] == "ok a+b"
    assert o[8] == "Usage: usr two <a> <b>"
    assert o[9] == "OK"
    assert o[10] == "Error: ZeroDivisionError: divide by zero"
    assert o[11] == ("usr: User commands\n" + line("big", "Huge output") + "\n" + line("boom", "Raises") + "\n"
                     + line("echo", "Echo the words") + "\n" + line("none", "Returns nothing") + "\n"
                     + line("two", "Exactly two"))
    assert o[12] == "usr echo: Echo the words\nUsage: usr echo <word>..."
    assert len(o[13]) == 1000 and o[13].endswith("\n[output truncated]")
    assert o[14] == [4096, 4096, 4096]


def test_bad_lines_get_clear_errors(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
for c in ("", "   ", b"\\xff\\xfe", b"metrics list v.b", "stat\\x00", "a\\x1b[2J", "x" * 1025, b"y" * 5000, 12,
          None, bytearray(b"stat"), "stat\\r\\n"):
    out(R(c))
""")
    assert o[0] == o[1] == "Error: Empty command (type help or ?)"
    assert o[2] == "Error: Command is not valid UTF-8 text"
    assert "\nv.b.soc " in o[3]
    assert o[4] == o[5] == "Error: Invalid character in command (control characters are not allowed)"
    assert o[6] == o[7] == "Error: Command too long (max 1024 characters)"
    assert o[8] == o[9] == "Error: Command must be text"
    assert o[10].startswith("Not charging") and o[11] == o[10]


# ---- output ---------------------------------------------------------------------------

def test_metrics_list_get_set(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
M._up_s += 12
for c in ("metrics list v.b", "metrics list v.b.c.*", "metrics list nosuch", "metrics get v.b.c.voltage",
          "metrics get xnl.v.b.soc.nominal", "metrics get nosuch", "metrics list odo", "metrics list xnl",
          "metrics list -a xnl", "metrics list -a v.b.soh", "metrics list a b"):
    out(R(c))
shell.local.secure = True
for c in ("metrics set v.b.soc 50.5", "metrics set v.b.soc abc", "metrics set nosuch 1",
          "metrics set v.c.mode range mode", "metrics get v.b.soc", "metrics get v.c.mode",
          "metrics set v.e.locked maybe", "metrics set v.e.locked no", "metrics set v.b.c.voltage 3.5,3.6,3.7",
          "metrics get v.b.c.voltage"):
    out(R(c))
out([M.get("v.b.soc"), M.get("v.e.locked"), M.age("v.b.soc"), M.get("v.c.mode")])
""")
    row = "%-40s [%6ds%s] %s"
    assert o[0].split("\n") == [row % ("v.b.c.voltage", 12, " ", "3.91,3.92V"),
                                row % ("v.b.range.est", 12, " ", "180km"),
                                row % ("v.b.range.ideal", 12, " ", "200.4km"),
                                row % ("v.b.soc", 12, " ", "85.5%"),
                                row % ("v.b.voltage", 12, " ", "380.25V")]
    assert o[1] == row % ("v.b.c.voltage", 12, " ", "3.91,3.92V")
    assert o[2] == "Unrecognised metric name"
    assert o[3] == "3.91,3.92V"
    assert o[4] == "(undefined)"
    assert o[5] == "Error: Unrecognised metric name"
    assert o[6] == row % ("v.p.odometer", 133, "S", "12345.6km")     # stale
    assert o[7] == "No values yet (1 metrics match; metrics list -a shows them)"
    assert o[8] == "%-40s [%s] " % ("xnl.v.b.soc.nominal", " " * 8)    # -a: never set, no value, no age
    assert o[9] == "%-40s [%s] " % ("v.b.soh", " " * 8)
    assert o[10] == "Usage: metrics list [-a] [<filter>]"
    assert o[11:21] == ["Metric set", "Error: Metric could not be set: not a float: 'abc'",
                        "Error: Unrecognised metric name", "Metric set", "50.5%", "range mode",
                        o[17], "Metric set", "Metric set", "3.5,3.6,3.7V"]
    assert o[17].startswith("Error: Metric could not be set: ")
    assert o[21] == [50.5, False, 0, "range mode"]


def test_output_is_bounded_with_marker(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
M.reserve(60)
for k in range(60):
    M.set(M.define("xtt.test.metric%03d" % k, "f", "kWh"), k * 1.5)
s = shell.Session(max_out=500)
r = R("metrics list", s)
out([len(r), r[-40:]])
r = R("metrics list xtt.test", shell.Session(max_out=1000))
out([len(r), r.endswith("\\n[output truncated]"), r.count("\\n")])
r = R("metrics list xtt.test.metric029", shell.local)
out(r)
""")
    assert o[0][0] <= 500 and o[0][1].endswith("\n[output truncated]")
    assert o[1][0] <= 1000 and o[1][1] and o[1][2] > 12
    assert o[2] == "%-40s [%6ds ] %s" % ("xtt.test.metric029", 0, "43.5kWh")


def test_stat_and_module_commands(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
out(R("stat"))
M.set("v.c.charging", True); M.set("v.c.state", "charging"); M.set("v.b.soh", 97.6)
out(R("stat"))
out(R("module info").split("\\n"))
out(R("module memory").split("\\n"))
out(R("module tasks"))
shell.hook("tasks", lambda: [("can", "running"), ("mqtt", "waiting")])
out(R("module tasks"))
out(R("module crashlog"))
shell.hook("crashlog", lambda: [])
out(R("module crashlog"))
shell.hook("crashlog", lambda: ["boot 3: WDT reset", "boot 5: MemoryError in mqtt"])
out(R("module crashlog"))
RESETS = []
shell.hook("reset", lambda: RESETS.append(1))
out(R("module reset"))
shell.local.secure = True
out([R("module reset"), len(RESETS)])
""")
    assert o[0] == ("Not charging\nSOC: 85.5%\nIdeal range: 200km\nEst. range: 180km\nODO: 12345.6km")
    assert o[1] == ("Standard - Charging\nSOC: 85.5%\nIdeal range: 200km\nEst. range: 180km\n"
                    "ODO: 12345.6km\nSOH: 98%")
    info = o[2]
    assert info[0].startswith("Firmware: micro-ovms ") and info[1].startswith("MicroPython: 1.")
    assert info[4].startswith("Uptime: ") and any(x.startswith("Free heap: ") for x in info)
    mem = o[3]
    assert mem[0].startswith("Heap total: ") and int(mem[0].split()[2]) > 90000
    assert o[4] == "Error: Task list not available"
    assert o[5] == line("can", "running") + "\n" + line("mqtt", "waiting")
    assert o[6:9] == ["Error: Crash log not available", "No crashes recorded",
                      "boot 3: WDT reset\nboot 5: MemoryError in mqtt"]
    assert o[9] == "Error: Secure command requires 'enable' mode"
    assert o[10] == ["Resetting system...", 1]


def test_notify_event_and_server_hooks(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
import asyncio
LOG = []
shell.hook("notify", lambda t, s, x: LOG.append(["n", t, s, x]))
shell.hook("event", lambda n: LOG.append(["e", n]))
out([R("notify raise info test hello"), R("server v3"), R("server v3 update all")])
shell.local.secure = True
for c in ("notify raise info charge.done Charge  is done", "notify raise bogus x y", "notify raise info a/b y",
          "event raise usr.my-event_1", "event raise bad/name", "event raise"):
    out(R(c))
shell.hook("server_status", lambda: "State: Connected\\n       OVMS V3 MQTT login successful")
async def upd(what):
    await asyncio.sleep_ms(10)
    LOG.append(["u", what])
    return "Sent %s metrics" % what
shell.hook("server_update", upd)
out(R("server v3"))
out(R("server v3 status"))
out(asyncio.run(shell.run_async("server v3 update all")))
out(asyncio.run(shell.run_async("server v3 update mod")))
out(LOG)
""")
    assert o[0] == ["Error: Secure command requires 'enable' mode", "State: Not running",
                    "Error: Server V3 not running"]
    assert o[1:7] == ["Raised info notification on charge.done",
                      "Error: Notification type must be info, alert, error or data",
                      "Error: Invalid notification subtype (letters, digits, . _ -)",
                      "Raised event: usr.my-event_1", "Error: Invalid event name (letters, digits, . _ -)",
                      "Usage: event raise <event>"]
    assert o[7] == o[8] == "State: Connected\n       OVMS V3 MQTT login successful"
    assert o[9] == "Sent all metrics" and o[10] == "Sent modified metrics"
    assert o[11] == [["n", "info", "charge.done", "Charge is done"], ["e", "usr.my-event_1"],
                     ["u", "all"], ["u", "modified"]]


# ---- security -------------------------------------------------------------------------

def test_secure_commands_need_enable(mlib, tmp_path):
    """The console (REPL): secure commands after `enable` (no password set: granted, as OVMS)."""
    o = sh(mlib, tmp_path, """
SEC = ("config set vehicle id X", "config rm vehicle id", "metrics set v.b.soc 1", "can send 7df 00", "lock",
       "unlock", "climatecontrol on", "climatecontrol off", "charge start", "charge stop", "charge limit 80",
       "module reset", "notify raise info a b", "event raise x")
s = shell.Session()
out([R(c, s) for c in SEC])
out([FRAMES, V.calls, config.get("vehicle", "id"), M.get("v.b.soc")])
out([R("enable", s), s.secure])            # no password configured: granted (as OVMS)
out(R("config set password module s3cret", s))
out([R("disable", s), s.secure, R("config set vehicle id X", s)])
""")
    assert set(o[0]) == {"Error: Secure command requires 'enable' mode"}
    assert o[1] == [[], [], "", 85.5]
    assert o[2] == ["Secure mode", True]
    assert o[3] == "Parameter has been set."
    assert o[4] == ["Secure mode disabled", False, "Error: Secure command requires 'enable' mode"]


def test_wrong_password_penalty_and_expiry(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
config.set("password", "module", "s3cret")
a = shell.Session(timeout=300)     # console sessions (a remote one checks no password)
b = shell.Session(timeout=300)
out([R("enable", a), R("enable wrong", a), a.penalty, a.secure])
a.penalty = 0
out([R("enable s3cret", a), R("enable s3cret", b), b.penalty, a.secure])   # locked out for 5 s, all clients
CLOCK[0] += 5001
out([R("enable s3cret", a), a.secure, b.secure, a.penalty])
# secure mode expires after server.v3 shell.timeout seconds without a secure command (default 300)
CLOCK[0] += 200 * 1000
out(R("config set vehicle name A", a))   # a secure command keeps it alive
CLOCK[0] += 200 * 1000
out([a.secure, R("config set vehicle id CAR", a)])
CLOCK[0] += 301 * 1000
out([a.secure, R("config set vehicle id CAR2", a), config.get("vehicle", "id")])
config.set("server.v3", "shell.timeout", "10") if "shell.timeout" in config.known("server.v3") else None
# the console session never expires
shell.local.secure = True
CLOCK[0] += 10 ** 7
out(shell.local.secure)
""")
    assert o[0] == ["Error: Password required: enable <password>", "Error: Invalid password", 5000, False]
    assert o[1] == ["Error: Too many attempts, wait 5 s", "Error: Too many attempts, wait 5 s", 5000, False]
    assert o[2] == ["Secure mode", True, False, 0]
    assert o[3] == "Parameter has been set."
    assert o[4] == [True, "Parameter has been set."]
    assert o[5] == [False, "Error: Secure command requires 'enable' mode", "CAR"]
    assert o[6] is True


def test_penalty_is_awaited_without_blocking(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
import asyncio, time
shell._ms = time.ticks_ms
config.set("password", "module", "s3cret")
TICKS = [0]
async def ticker():
    while True:
        await asyncio.sleep_ms(100)
        TICKS[0] += 1
async def main():
    t = asyncio.create_task(ticker())
    s = shell.Session()
    t0 = time.ticks_ms()
    r = await shell.run_async("enable nope", s)
    dt = time.ticks_diff(time.ticks_ms(), t0)
    t.cancel()
    out([r, dt, TICKS[0], s.penalty])
asyncio.run(main())
""")
    r, dt, ticks, pen = o[0]
    assert r == "Error: Invalid password" and pen == 0
    assert 4900 <= dt < 7000
    assert ticks >= 40   # the loop kept running during the 5 s penalty


def test_readonly_mqtt_shell(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
config.set("server.v3", "shell.readonly", "yes")
s = shell.session_for("viewer")
out([s.readonly, R("enable", s), R("config set vehicle id X", s), R("lock", s), s.secure])
out(R("metrics get v.b.soc", s))
config.set("server.v3", "shell.readonly", "no")
s = shell.session_for("viewer")
out([s.readonly, R("enable", s), R("config set vehicle id X", s)])
config.set("server.v3", "commands", "signed")
s = shell.session_for("viewer")
out([R("enable", s), R("config set vehicle id Y", s), s.secure, config.get("vehicle", "id")])
config.rm("password", "module")     # no module password: still nothing secure over MQTT
s = shell.session_for("viewer")
out([R("enable", s), s.secure])
""")
    ro = "Error: Read-only shell: this command is not allowed over MQTT"
    assert o[0] == [True, ro, ro, ro, False]
    assert o[1] == "85.5%"
    assert o[2] == [False, "Secure mode (trusted server link)", "Parameter has been set."]
    sign = "Error: Secure command requires a signed command (server.v3 commands signed)"
    assert o[3] == [sign, sign, False, "X"]
    assert o[4] == [sign, False]


def test_secrets_are_never_shown(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
shell.local.secure = True
out(R("config set password module s3cretPW"))
out(R("config set password server.v3 mqttPW99"))
out(R("config set wifi.ssid HomeNet wifiPW77"))
out(R("config set password module " + "L" * 70 + "s3cretPW"))
RS = [R(c) for c in ("config list", "config list password", "config list wifi.ssid", "config get password module",
                     "config get wifi.ssid HomeNet", "config get password server.v3", "config list server.v3")]
out(RS)
out(config.get("password", "module"))
""", heap="128K")   # seven commands' modules as bytecode in the heap (frozen on the device)
    assert o[0] == o[1] == o[2] == "Parameter has been set."
    assert o[3].startswith("Error: ") and "s3cretPW" not in o[3] and "LLLL" not in o[3]
    rs = o[4]
    for r in rs:
        for secret in ("s3cretPW", "mqttPW99", "wifiPW77"):
            assert secret not in r
    assert "password (writeable)" in rs[0].split("\n")
    assert rs[1] == "password (writeable)\n  module: ********\n  server.v3: ********"
    assert rs[2] == "wifi.ssid (writeable)\n  HomeNet: ********"
    assert rs[3] == "Error: password module is write-only (secret)"
    assert rs[4] == "Error: wifi.ssid HomeNet is write-only (secret)"
    assert "  port: 0" in rs[6].split("\n")
    assert o[5] == "s3cretPW"


def test_config_commands(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
shell.local.secure = True
for c in ("config get vehicle id", 'config set vehicle name "My Leaf"', "config set vehicle name Leaf  two",
          "config get vehicle name", "config set server.v3 port abc", "config set nosuch x 1", "config get nosuch x",
          "config list nosuch", "config set usr my.key some value", "config list usr", "config rm usr my.key",
          "config rm usr my.key", "config rm nosuch x", "config get server.v3 port", "config set server.v3 port 8883",
          "config get server.v3 port", "config set"):
    out(R(c))
out([config.get("vehicle", "name"), config.get("server.v3", "port"), config.instances("usr")])
""")
    assert o[0] == "(not set)"
    assert o[1] == o[2] == "Parameter has been set."
    assert o[3] == "Leaf two"
    assert o[4] == "Error: Invalid value 'abc' for server.v3 port: expected an integer 0..65535"
    assert o[5].startswith("Error: Unknown parameter 'nosuch'")
    assert o[6] == o[7] == "Error: Unknown parameter 'nosuch'"
    assert o[8] == "Parameter has been set."
    assert o[9] == "usr (readable writeable)\n  my.key: some value"
    assert o[10] == "Parameter has been removed."
    assert o[11] == "Error: Parameter usr my.key is not set"
    assert o[12] == "Error: Unknown parameter 'nosuch'"
    assert o[13] == "0" and o[14] == "Parameter has been set." and o[15] == "8883"
    assert o[16] == "Usage: config set <param> <instance> <value>"
    assert o[17] == ["Leaf two", 8883, []]


# ---- vehicle and CAN commands -----------------------------------------------------------------

def test_vehicle_commands_send_frames(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
out([R("lock"), FRAMES])
R("enable")
out([R("lock"), FRAMES])
del FRAMES[:]
for c in ("unlock", "climatecontrol on", "climatecontrol off", "charge limit 80", "charge limit 20",
          "charge limit 101", "charge limit x", "charge start", "charge stop"):
    out([R(c), FRAMES[:]])
    del FRAMES[:]
out(V.calls)
CAN_OK[0] = False
out([R("lock"), len(FRAMES)])
shell.hook("can_send", None)
out(R("lock"))
shell.hook("vehicle", None)
out(R("lock"))
""")
    assert o[0] == ["Error: Secure command requires 'enable' mode", []]
    assert o[1] == ["Vehicle locked", [[2, 0x60D, False, "0102"], [2, 0x18DAF110, True, "30"]]]
    assert o[2] == ["Error: Unlock not available on this vehicle", []]
    assert o[3] == ["Climate Control on", [[1, 0x56E, False, "4e08"]]]
    assert o[4] == ["Error: Climate control not available on this vehicle", []]
    assert o[5] == ["Charge limit set to 80%", [[1, 0x1F2, False, "50"]]]
    assert o[6] == ["Error: Charge limit below 50% not supported by this vehicle", []]
    assert o[7] == ["Error: Charge limit must be a SOC of 1..100 %", []]
    assert o[8] == o[7]
    assert o[9] == ["Error: Charge start: invalid frame in vehicle definition (bad bus 9)", []]
    assert o[10] == ["Error: Charge stop not available on this vehicle", []]
    assert o[11] == [["lock", []], ["unlock", []], ["climatecontrol.on", []],
                     ["climatecontrol.off", []], ["charge.limit", [80]], ["charge.limit", [20]],
                     ["charge.start", []], ["charge.stop", []]]
    assert o[12][0].startswith("Error: vehicle could not be locked (CAN transmit failed")
    assert o[13] == "Error: vehicle could not be locked (CAN bus not available)"
    assert o[14] == "Error: No vehicle module selected"


def test_can_send_and_status(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
out(R("can status"))
shell.hook("can_status", lambda: {"state": "running", "rx": 1234, "tx": 2, "overruns": 0})
out(R("can status"))
shell.local.secure = True
for c in ("can send 7df 02010d", "can send 0x18DAF110 02:10:03", "can send 800 00", "can send 7e0 \\"\\" 2",
          "can send 7e0 0102030405060708", "can send 7e0 010203040506070809", "can send 7e0 0g", "can send 7e0 012",
          "can send zz 00", "can send 20000000 00", "can send 7df 00 5", "can send 7df 00 x", "can send 7df"):
    out(R(c))
out(FRAMES)
""")
    assert o[0] == "Error: CAN bus not available"
    assert o[1] == "\n".join([line("overruns", "0"), line("rx", "1234"), line("state", "running"), line("tx", "2")])
    assert o[2:] == ["Frame sent: bus 1 id 7df data 02 01 0d", "Frame sent: bus 1 id ext 18daf110 data 02 10 03",
                     "Frame sent: bus 1 id ext 800 data 00", "Frame sent: bus 2 id 7e0 data (none)",
                     "Frame sent: bus 1 id 7e0 data 01 02 03 04 05 06 07 08",
                     "Error: Invalid data (0 to 8 bytes as hex, e.g. 02010d)",
                     "Error: Invalid data (0 to 8 bytes as hex, e.g. 02010d)",
                     "Error: Invalid data (0 to 8 bytes as hex, e.g. 02010d)",
                     "Error: Invalid CAN id (hex, up to 7FF standard or 1FFFFFFF extended)",
                     "Error: Invalid CAN id (hex, up to 7FF standard or 1FFFFFFF extended)",
                     "Error: Invalid bus (1..4)", "Error: Invalid bus (1..4)",
                     "Usage: can send <id> <hexdata> [<bus>]",
                     [[1, 0x7DF, False, "02010d"], [1, 0x18DAF110, True, "021003"], [1, 0x800, True, "00"],
                      [2, 0x7E0, False, ""], [1, 0x7E0, False, "0102030405060708"]]]


# ---- MQTT transport -------------------------------------------------------------------

def test_mqtt_submit_runs_in_tasks_with_limits(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
import asyncio, time
shell._ms = time.ticks_ms
REPLIES = []
async def reply(cid, cmd_id, text):
    REPLIES.append([cid, cmd_id, text])
EV = []
shell.hook("event", lambda n: EV.append(n))
async def slow(s, a):
    await asyncio.sleep_ms(int(a[0]))
    return "slept " + a[0]
shell.register("usr", "", None)
shell.register("usr sleep", "", lambda s, a: slow(s, a), "<ms>", 1, 1, False)
async def main():
    # the receive path only queues: nothing has run when submit() returns
    ok = shell.submit("app", "1", b"metrics get v.b.soc", reply)
    out([ok, REPLIES[:]])
    await asyncio.sleep_ms(50)
    out(REPLIES[:])
    del REPLIES[:]
    # no secure state outlives a command: with signed commands, an unsigned one after a
    # signed one from the same client id is not secure
    config.set("server.v3", "commands", "signed")
    shell.submit("app", "2", "enable", reply)
    await asyncio.sleep_ms(20)
    shell.submit("app", "3", "event raise one", reply, secure=True)
    shell.submit("app", "6", "event raise two", reply)
    await asyncio.sleep_ms(50)
    config.set("server.v3", "commands", "trusted")
    shell.submit("other", "1", "event raise zero", reply)
    await asyncio.sleep_ms(50)
    out(sorted(REPLIES))
    del REPLIES[:]
    # QoS 2 / DUP duplicates of the same command run once
    out([shell.submit("app", "4", "event raise dup", reply, qos=2),
         shell.submit("app", "4", "event raise dup", reply, qos=2),
         shell.submit("app", "4", "event raise dup", reply, qos=1, dup=True),
         shell.submit("app", "5", "event raise dup", reply, qos=2)])
    await asyncio.sleep_ms(50)
    out([EV, len(REPLIES)])
    del REPLIES[:]
    # at most MAX_RUNNING at once, the others are told to retry
    t0 = time.ticks_ms()
    for k in range(4):
        shell.submit("app", "s%d" % k, "usr sleep 300", reply)
    await asyncio.sleep_ms(20)
    busy = sorted(REPLIES)
    await asyncio.sleep_ms(400)
    out([shell.MAX_RUNNING, busy, sorted(REPLIES)])
    del REPLIES[:]
    # time limit
    shell.CMD_TIMEOUT = 1
    shell.submit("app", "t", "usr sleep 3000", reply)
    await asyncio.sleep_ms(1300)
    out(REPLIES[:])
    out(shell._running)
asyncio.run(main())
""")
    assert o[0] == [True, []]
    assert o[1] == [["app", "1", "85.5%"]]
    sign = "Error: Secure command requires a signed command (server.v3 commands signed)"
    assert o[2] == [["app", "2", sign], ["app", "3", "Raised event: one"], ["app", "6", sign],
                    ["other", "1", "Raised event: zero"]]
    assert o[3] == [True, False, False, True]
    assert o[4] == [["one", "zero", "dup", "dup"], 2]
    busy = "Error: Too many commands in progress, try again later"
    assert o[5] == [2, [["app", "s2", busy], ["app", "s3", busy]],
                    [["app", "s0", "slept 300"], ["app", "s1", "slept 300"], ["app", "s2", busy],
                     ["app", "s3", busy]]]
    assert o[6] == [["app", "t", "Error: Command timed out after 1 s"]]
    assert o[7] == 0


def test_no_remote_session_is_kept(mlib, tmp_path):
    """Every MQTT command gets a fresh session: nothing is kept per client id."""
    o = sh(mlib, tmp_path, """
for k in range(50):
    s = shell.session_for("client%d" % k)
out([hasattr(shell, "_sessions"), s.secure, shell.session_for("client1") is shell.session_for("client1")])
""")
    assert o[0] == [False, True, False]


# ---- console ----------------------------------------------------------------------------

def test_repl_reads_stdin(mlib, tmp_path):
    code = ("import sys\nsys.path[:0] = [%r]\nSTORE = %r\n" % (mlib, str(tmp_path)) + PRELUDE
            + "shell.repl()\nprint('left repl')\n")
    code = code.replace("shell.repl()", "config.set('password', 'module', 'pw 1')\nshell.repl()")
    p = subprocess.run([MICROPYTHON, "-X", "heapsize=100K", "-c", code], capture_output=True, text=True,
                       timeout=60, input="metrics get v.b.soc\n\nlock\nenable\npw 1\nlock\nexit\nstat\n")
    assert p.returncode == 0, p.stderr
    o = p.stdout
    seq = ["OVMS> ", "85.5%", "OVMS> ", "Error: Secure command requires 'enable' mode", "OVMS> ", "Password: ",
           "Secure mode", "OVMS# ", "Vehicle locked", "OVMS# ", "left repl"]
    k = 0
    for s in seq:
        k = o.index(s, k) + len(s)
    assert "Not charging" not in o    # nothing after exit ran


def test_repl_usage_from_python(mlib, tmp_path):
    """README form: from ovms import shell; print(shell.run("metrics list v.b"))"""
    o = sh(mlib, tmp_path, """
from ovms import shell as s2
out(s2.run("metrics list v.b.soc"))
""")
    assert o[0] == "%-40s [%6ds ] %s" % ("v.b.soc", 0, "85.5%")


# ---- memory -----------------------------------------------------------------------------

def test_memory_footprint(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
import gc
gc.collect()
a = gc.mem_alloc()
from ovms import shell
gc.collect()
b = gc.mem_alloc()
shell.run("help")
gc.collect()
c = gc.mem_alloc()
for m in ("shell.metrics", "shell.config", "shell.module", "shell.can", "shell.vehicle"):
    __import__("ovms." + m)
gc.collect()
d = gc.mem_alloc()
out([b - a, c - a, d - a])
""", prelude=False)
    core, after_help, everything = o[0]
    print("shell core %d B, all command modules %d B (x64 .mpy)" % (core, everything))
    assert after_help - core < 256  # help lists lazy commands without importing their modules
    assert core < 24000 and everything < 64000


def test_command_modules_unload_when_heap_is_short(mlib, tmp_path):
    o = sh(mlib, tmp_path, """
import gc, sys, ovms
from ovms import shell, metrics
R = shell.run
metrics.set("v.b.soc", 85.5)
shell.register("xtt", "App commands", None)
shell.register("xtt hello", "Say hello", lambda s, a: "hello", "", 0, 0, False)
out([R("metrics get v.b.soc"), "ovms.shell.metrics" in sys.modules])
gc.collect()
ballast = []
while gc.mem_free() * 4 > gc.mem_free() + gc.mem_alloc():    # leave < 1/4 of the heap free
    ballast.append(bytearray(512))
out([R("metrics get v.b.soc"), "ovms.shell.metrics" in sys.modules, "metrics" in dir(ovms.shell)])
ballast = None
gc.collect()
out([R("met g v.b.soc"), "ovms.shell.metrics" in sys.modules, R("xtt hello"), R("metrics ?").count("\\n")])
""", prelude=False)
    assert o[0] == ["85.5%", True]
    assert o[1] == ["85.5%", False, False]      # answered, then dropped to give the heap back
    assert o[2] == ["85.5%", True, "hello", 3]  # loads again on use; app commands kept


# ---- a real vehicle definition --------------------------------------------------------

def test_vehicle_commands_with_a_real_definition(mlib, tmp_path):
    """Kona EV definition (firmware/vehicles/kn): charge limit is defined, lock is not."""
    import dbc2table
    import vehicles
    vdir = os.path.join(os.path.dirname(LIB), "firmware", "vehicles", "kn")
    os.remove(vehicles.build(vdir, str(tmp_path), mpy=True))
    o = sh(mlib, tmp_path, """
sys.path.append(STORE)
from ovms import shell
from ovms.can import vehicle
R = shell.run
FRAMES = []
shell.hook("can_send", lambda bus, fid, ext, data: FRAMES.append([bus, fid, ext, "".join(["%02x" % b for b in data])]))
vehicle.load("KN")          # no "vehicle" hook: the shell uses ovms.can.vehicle.current()
out(R("charge limit 80"))
shell.local.secure = True
out([R("charge limit 80"), FRAMES])
del FRAMES[:]
for c in ("charge limit 5", "lock", "unlock", "climatecontrol on", "charge start", "charge current 16", "wakeup",
          "homelink 2", "homelink 4"):
    out(R(c))
out(FRAMES)
""", prelude=False)
    assert o[0] == "Error: Secure command requires 'enable' mode"
    assert o[1][0] == "Charge limit set to 80%"
    (bus, fid, ext, data), = o[1][1]
    db = dbc2table.load_dbc(os.path.join(vdir, "pcan.dbc"))     # cantools, community-DBC quirks fixed
    msg = db.get_message_by_frame_id(fid)
    assert (bus, msg.name, ext) == (1, "UpdateChargeSettings", False)
    sig = msg.decode(bytes.fromhex(data), decode_choices=False)
    assert sig["SetACChargeLimit"] == 80 and sig["SetDCChargeLimit"] == 80 and sig["SetChargeCurrent"] == 0
    assert o[2] == "Error: charge.limit: 5 is out of range 10..100"
    assert o[3:11] == ["Error: Lock not available on this vehicle", "Error: Unlock not available on this vehicle",
                       "Error: Climate control not available on this vehicle",
                       "Error: Charge start not available on this vehicle",
                       "Error: Charge current not available on this vehicle",
                       "Error: Wakeup not available on this vehicle",
                       "Error: Homelink not available on this vehicle",
                       "Error: Homelink button must be 1, 2 or 3"]
    assert o[11] == []


UNICODE_FLOOD = r'''
import gc, random
random.seed(11)
def word(b, n):
    # n random characters appended to bytearray b as UTF-8 (mostly CJK, some 2- and 4-byte)
    for _ in range(n):
        k = random.getrandbits(4)
        if k < 2:
            cp = 0x80 + random.getrandbits(10) % 0x780
            b.append(0xC0 | cp >> 6)
            b.append(0x80 | cp & 0x3F)
        elif k < 3:
            cp = 0x1F300 + random.getrandbits(10)
            b.append(0xF0 | cp >> 18)
            b.append(0x80 | cp >> 12 & 0x3F)
            b.append(0x80 | cp >> 6 & 0x3F)
            b.append(0x80 | cp & 0x3F)
        else:
            cp = 0x4E00 + random.getrandbits(15) % 20992
            b.append(0xE0 | cp >> 12)
            b.append(0x80 | cp >> 6 & 0x3F)
            b.append(0x80 | cp & 0x3F)
PRE = (b"", b"metrics get ", b"help ", b'"', b"config get vehicle ", b"m", b"stat ")
def flood(n, ascii=False):
    oom = 0
    for i in range(n):
        b = bytearray(PRE[i % len(PRE)])
        if ascii:
            b += b"zq"
        else:
            word(b, 1 + random.getrandbits(7))
        if i & 4:
            b += b" "
            if ascii:
                b += b"zq"
            else:
                word(b, 1 + random.getrandbits(4))
        if i & 8:
            b += b"?"
        r = R(bytes(b) if i & 1 else str(b, "utf-8"))
        if "memory" in r:
            oom += 1
    return oom
flood(16, True)         # warm up: the command modules load, caches fill
gc.collect()
before = gc.mem_free()
oom = flood(10000)
gc.collect()
out([before, gc.mem_free(), oom])
'''


def test_random_unicode_commands_leave_the_heap_where_it_was(mlib, tmp_path):
    """Unknown commands of random characters (CJK, 2- and 4-byte UTF-8, as str and as bytes)
    must not turn each new character into a permanent qstr: the free heap after 10,000 of
    them is where it was after the first 200."""
    o = sh(mlib, tmp_path, UNICODE_FLOOD)
    assert o, "device died"
    before, after, oom = o[0]
    assert oom == 0
    assert after >= before - 1024, (before, after)
