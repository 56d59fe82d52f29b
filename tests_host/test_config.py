"""Config store (ovms.config) on the micropython binary: schema, secrets, persistence, notifications."""
import json
import os

import pytest

from util import LIB, MPY_CROSS, compiled_lib, run_mpy


def cfg(root, code, heap="100K", text=False):
    """Run code with `config` initialised on root; W = the load() warnings.
    out(x) in the snippet emits x; returns the list of them (and the other output if text)."""
    pre = ("import json\nfrom ovms import config\nW = config.init(%r)\n"
           "def out(x):\n    print('@' + json.dumps(x))\n" % str(root))
    r = run_mpy(pre + code, heap=heap, path=(compiled_lib(),))   # bytecode, as on a module
    outs = [json.loads(x[1:]) for x in r.stdout.splitlines() if x.startswith("@")]
    if text:
        return outs, "".join(x + "\n" for x in r.stdout.splitlines() if not x.startswith("@"))
    return outs


def errors(root, calls):
    """Try config.set(*c) for each call, return the ValueError messages (or None if accepted)."""
    code = ("for c in %r:\n"
            "    try:\n        config.set(*c)\n        out(None)\n"
            "    except ValueError as e:\n        out(str(e))\n" % (calls,))
    return cfg(root, code)


# ---- schema and validation ------------------------------------------------------------

def test_defaults_and_types(tmp_path):
    out = cfg(tmp_path, """
out(W)
out([config.get('server.v3', 'port'), config.get('server.v3', 'tls'), config.get('vehicle', 'can.mode'),
     config.get('vehicle', 'can.bitrate'), config.get('vehicle', 'id'), config.get('server.v3', 'ca'),
     config.get('server.v3', 'updatetime.keepalive')])
out([config.get('vehicle', 'id', 'X'), config.get('server.v3', 'port', 1883), config.get('usr', 'nothing'),
     config.get('nope', 'x', 5), config.get('wifi.ssid', 'none'), config.get('usr', 'nothing', 'dflt')])
config.set('server.v3', 'port', '8883')
config.set('server.v3', 'tls', 'false')
config.set('vehicle', 'can.mode', 'NORMAL')
out([config.get('server.v3', 'port'), config.get('server.v3', 'tls'), config.get('vehicle', 'can.mode'),
     config.display('server.v3', 'port'), config.display('server.v3', 'tls')])
""")
    assert out[0] == ["config: no config in %s yet, using defaults" % tmp_path]
    assert out[1] == [0, True, "listen", 500000, "", "/store/ca.pem", 120]  # TLS unless told otherwise
    # the schema default wins over the caller's (one source of truth, as `config list` shows);
    # the caller's default is for free-form and unknown instances
    assert out[2] == ["", 0, None, 5, None, "dflt"]
    assert out[3] == [8883, False, "normal", "8883", "no"]


@pytest.mark.parametrize("word,canon", [("yes", "yes"), ("no", "no"), ("TRUE", "yes"), ("false", "no"),
                                        ("1", "yes"), ("0", "no"), ("on", "yes"), ("Off", "no")])
def test_bool_words(tmp_path, word, canon):
    out = cfg(tmp_path, "config.set('server.v3', 'tls', %r)\nout([config.display('server.v3', 'tls'), "
                        "config.get('server.v3', 'tls')])" % word)
    assert out == [[canon, canon == "yes"]]


def test_invalid_values_refused_with_clear_messages(tmp_path):
    msgs = errors(tmp_path, [
        ("server.v3", "port", "abc"), ("server.v3", "port", "70000"), ("server.v3", "port", "-1"),
        ("server.v3", "tls", "maybe"), ("vehicle", "can.mode", "loud"), ("vehicle", "id", "x" * 33),
        ("bogus", "x", "1"), ("vehicle", "colour", "red"), ("vehicle", "can.bitrate", "5"),
        ("server.v3", "port", "1883"), ("vehicle", "id", "x" * 32)])
    assert msgs == [
        "Invalid value 'abc' for server.v3 port: expected an integer 0..65535",
        "Invalid value '70000' for server.v3 port: expected an integer 0..65535",
        "Invalid value '-1' for server.v3 port: expected an integer 0..65535",
        "Invalid value 'maybe' for server.v3 tls: expected yes or no",
        "Invalid value 'loud' for vehicle can.mode: expected one of listen|normal",
        "Invalid value for vehicle id: too long (33 > 32 chars)",
        msgs[6], msgs[7],
        "Invalid value '5' for vehicle can.bitrate: expected an integer 10000..1000000",
        None, None]
    assert msgs[6].startswith("Unknown parameter 'bogus' (known: ")
    assert "server.v3" in msgs[6] and "vehicle" in msgs[6] and "wifi.ssid" in msgs[6]
    assert msgs[7].startswith("Unknown instance 'colour' for parameter 'vehicle' (known: ")
    assert "can.mode" in msgs[7]
    # nothing invalid was stored
    out = cfg(tmp_path, "out([config.get('server.v3', 'port'), config.instances('bogus'), "
                        "config.instances('vehicle')])")
    assert out == [[1883, [], ["id"]]]


def test_free_form_params_and_instance_names(tmp_path):
    msgs = errors(tmp_path, [
        ("usr", "my.plugin.x", "anything at all"), ("wifi.ssid", "Home Net 5G", "pass word"),
        ("wifi.ssid", "", "x"), ("wifi.ssid", "a" * 65, "x"), ("usr", "bad\tname", "x"),
        ("usr", "*", "x"), ("usr", "long", "y" * 257)])
    assert msgs[:2] == [None, None]
    assert msgs[2] == "Invalid instance name '' for wifi.ssid: 1..64 chars"
    assert msgs[3].startswith("Invalid instance name 'aaaa") and msgs[3].endswith("for wifi.ssid: 1..64 chars")
    assert msgs[4] == "Invalid instance name for usr: control characters"
    assert msgs[5] == "Invalid instance name '*' for usr: 1..64 chars"
    assert msgs[6] == "Invalid value for usr long: too long (257 > 256 chars)"
    out = cfg(tmp_path, "out([config.instances('wifi.ssid'), config.get('wifi.ssid', 'Home Net 5G'), "
                        "config.freeform('usr'), config.freeform('vehicle')])")
    assert out == [[["Home Net 5G"], "pass word", True, False]]


def test_params_known_describe(tmp_path):
    out = cfg(tmp_path, """
out(config.params())
out(config.known('password'))
out([config.describe('server.v3', 'port'), config.describe('server.v3', 'tls'),
     config.describe('vehicle', 'can.mode'), config.describe('vehicle', 'id'),
     config.describe('password', 'module'), config.describe('vehicle', 'nope')])
out(config.check('server.v3', 'tls', 'TRUE'))
""")
    for p in ("vehicle", "server.v3", "password", "wifi.ssid", "wifi.ap", "module", "ota", "usr", "auto"):
        assert p in out[0]
    assert out[0] == sorted(out[0])
    assert out[1] == ["module", "server.v3"]
    assert out[2] == ["integer 0..65535 (default 0)", "yes|no (default yes)",
                      "one of listen|normal (default listen)", "text, max 32 chars (default '')",
                      "secret text, max 64 chars", "unknown"]
    assert out[3] == "yes"


def test_register_extends_schema(tmp_path):
    out = cfg(tmp_path, """
config.register('xnl modelyear i 2013 2010:2030\\nxnl canwrite b no -')
out(config.get('xnl', 'modelyear'))
config.set('xnl', 'canwrite', 'yes')
out(config.get('xnl', 'canwrite'))
for bad in ('xnl x q 1 2', 'too few fields'):
    try:
        config.register(bad)
        out('accepted')
    except ValueError as e:
        out(str(e))
try:
    config.set('xnl', 'modelyear', '1999')
except ValueError as e:
    out(str(e))
""")
    assert out == [2013, True, "bad schema line: xnl x q 1 2", "bad schema line: too few fields",
                   "Invalid value '1999' for xnl modelyear: expected an integer 2010..2030"]


# ---- secrets ---------------------------------------------------------------------------

def test_secrets_write_only(tmp_path):
    out = cfg(tmp_path, """
config.set('password', 'server.v3', 'hunter2')
config.set('wifi.ssid', 'HomeNet', 'wifipass1')
# internal callers get the value ...
out([config.get('password', 'server.v3'), config.get('wifi.ssid', 'HomeNet')])
# ... anything shown to a user is masked
out([config.display('password', 'server.v3'), config.display('password', 'module'),
     config.display('wifi.ssid', 'HomeNet'), config.display('vehicle', 'timezone')])
out([config.secret('password', 'server.v3'), config.secret('password', 'other'), config.secret('wifi.ssid', 'x'),
     config.secret('wifi.ap', 'x'), config.secret('vehicle', 'id'), config.secret('usr', 'x'),
     config.secret('server.v3', 'user')])
out([config.readable('password'), config.readable('vehicle'), config.readable('wifi.ssid'), config.readable('usr')])
try:
    config.set('password', 'module', 'S3cretS3cret' * 10)
except ValueError as e:
    out(str(e))
""")
    assert out[0] == ["hunter2", "wifipass1"]
    assert out[1] == ["********", "", "********", "UTC0"]
    assert out[2] == [True, True, True, True, False, False, False]
    assert out[3] == [False, True, False, True]
    # the error for a bad secret never echoes the value
    assert "S3cret" not in out[4] and out[4] == "Invalid value for password module: too long (120 > 64 chars)"


# ---- persistence -----------------------------------------------------------------------

def test_persisted_round_trip_with_odd_characters(tmp_path):
    vals = [("usr", "tabs", "a\tb\tc"), ("usr", "lines", "one\ntwo\r\nthree"), ("usr", "slash", "C:\\path\\n"),
            ("usr", "unicode", "Zürich °C ✓"), ("wifi.ssid", "Café Wi-Fi", "pa\\ss\tword"),
            ("usr", "empty", ""), ("vehicle", "id", "DEMO1")]
    cfg(tmp_path, "for p, i, v in %r:\n    config.set(p, i, v)\nout(config.generation())" % (vals,))
    out = cfg(tmp_path, "out(W)\nout([config.get(p, i) for p, i, v in %r])\nout(config.generation())" % (vals,))
    assert out[0] == []
    assert out[1] == [v for p, i, v in vals]
    assert out[2] == len(vals)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ovms.cfg", "ovms.cfg.bak"]
    text = (tmp_path / "ovms.cfg").read_text()
    assert text.startswith("#ovms-config 1 gen=7\n") and text.splitlines()[-1].startswith("#end 7 ")
    # last-good copy is the previous generation
    assert (tmp_path / "ovms.cfg.bak").read_text().startswith("#ovms-config 1 gen=6\n")


def test_unchanged_value_is_not_rewritten(tmp_path):
    out = cfg(tmp_path, """
config.set('vehicle', 'id', 'A')
g = config.generation()
config.set('vehicle', 'id', 'A')
config.set('server.v3', 'tls', 'no')
config.set('server.v3', 'tls', 'false')
out([g, config.generation()])
""")
    assert out == [[1, 2]]


def test_rm_and_wildcard_rm(tmp_path):
    out = cfg(tmp_path, """
config.set('usr', 'a', '1'); config.set('usr', 'b', '2'); config.set('vehicle', 'id', 'Z')
out([config.rm('usr', 'a'), config.rm('usr', 'a'), config.rm('nope', 'x'), config.instances('usr')])
out([config.rm('usr', '*'), config.instances('usr'), config.params().count('usr')])
out([config.rm('vehicle', 'id'), config.get('vehicle', 'id'), config.is_set('vehicle', 'id')])
""")
    assert out == [[True, False, False, ["b"]], [True, [], 1], [True, "", False]]
    out = cfg(tmp_path, "out([W, config.instances('usr'), config.instances('vehicle')])")
    assert out == [[[], [], []]]


def test_update_is_all_or_nothing(tmp_path):
    out = cfg(tmp_path, """
config.set('vehicle', 'id', 'OLD')
try:
    config.update([('vehicle', 'id', 'NEW'), ('server.v3', 'port', 'x')])
except ValueError as e:
    out(str(e))
out([config.get('vehicle', 'id'), config.generation()])
config.update([('vehicle', 'id', 'NEW'), ('server.v3', 'port', 8883), ('usr', 'gone', None)])
out([config.get('vehicle', 'id'), config.get('server.v3', 'port'), config.generation()])
""")
    assert out == ["Invalid value 'x' for server.v3 port: expected an integer 0..65535", ["OLD", 1], ["NEW", 8883, 2]]


def test_entry_limit(tmp_path):
    out = cfg(tmp_path, """
try:
    config.update([('usr', 'k%d' % i, 'v') for i in range(300)])
except ValueError as e:
    out(str(e))
out(config.instances('usr'))
""")
    assert out == ["Config full (256 values): remove some first", []]


def test_failed_write_keeps_old_value(tmp_path):
    # the flash write fails (e.g. file system full): set() raises, memory and flash keep the old value
    out = cfg(tmp_path, """
config.set('vehicle', 'id', 'OLD')
real = config.open if hasattr(config, 'open') else None
def broken(*a):
    raise OSError(28)
config.open = broken
try:
    config.set('vehicle', 'id', 'NEW')
except OSError as e:
    out(e.args[0])
del config.open
out(config.get('vehicle', 'id'))
out(config.load())
out(config.get('vehicle', 'id'))
""")
    assert out == [28, "OLD", [], "OLD"]


# ---- change notifications ------------------------------------------------------------------

def test_change_notifications(tmp_path):
    out, text = cfg(tmp_path, text=True, code="""
seen = []
def cb(p, i):
    seen.append([p, i, config.get(p, i)])
def bad(p, i):
    raise RuntimeError('callback bug')
config.on_change(cb)
config.on_change(bad)
config.on_change(cb)          # registering twice: called once
config.set('server.v3', 'server', 'mqtt.example.org')
config.set('server.v3', 'server', 'mqtt.example.org')   # unchanged: no call
try:
    config.set('server.v3', 'port', 'x')                # invalid: no call
except ValueError:
    pass
config.update([('server.v3', 'port', 8883), ('server.v3', 'tls', 'yes')])
config.rm('server.v3', 'server')
config.rm('server.v3', 'server')                        # nothing removed: no call
config.off_change(bad)
config.off_change(cb)
config.set('vehicle', 'id', 'X')                        # unregistered: no call
out(seen)
""")
    assert out == [[["server.v3", "server", "mqtt.example.org"], ["server.v3", "port", 8883],
                    ["server.v3", "tls", True], ["server.v3", "server", ""]]]
    # a failing callback is reported, and neither stops the others nor the write
    assert text.count("config: change callback failed: RuntimeError('callback bug',)") == 4


# ---- corrupt files ------------------------------------------------------------------------

def _write_good(root, pairs):
    cfg(root, "config.update(%r)" % ([(p, i, v) for p, i, v in pairs],))


CORRUPTIONS = {
    "garbage": lambda b: b"\x00\xff garbage \x12" * 20,
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "no_end_marker": lambda b: b[: b.index(b"#end")],
    "bit_flip_in_value": lambda b: b.replace(b"DEMO", b"DEMP"),
    "bad_utf8": lambda b: b.replace(b"DEMO", b"D\xffMO"),
    "extra_after_end": lambda b: b + b"vehicle\tid\tEVIL\n",
    "bad_header": lambda b: b.replace(b"#ovms-config 1", b"#ovms-config 9"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_config_boots_on_defaults_and_says_so(tmp_path, kind):
    _write_good(tmp_path, [("vehicle", "id", "DEMO"), ("server.v3", "port", "8883")])
    assert not (tmp_path / "ovms.cfg.bak").exists()  # one generation written: no last-good copy
    f = tmp_path / "ovms.cfg"
    f.write_bytes(CORRUPTIONS[kind](f.read_bytes()))
    bad = f.read_bytes()
    out = cfg(tmp_path, "out(W)\nout([config.get('vehicle', 'id'), config.get('server.v3', 'port')])")
    w = out[0]
    assert len(w) == 2, w
    assert w[0].startswith("config: %s is corrupt (" % f) and w[0].endswith("moved to %s.corrupt-1" % f)
    assert w[1] == "config: booting on defaults"
    assert out[1] == ["", 0]
    # the damaged file is kept for inspection, nothing else is invented
    assert (tmp_path / "ovms.cfg.corrupt-1").read_bytes() == bad
    assert not f.exists()
    # the module still works: a new value is written and the next boot is clean
    out = cfg(tmp_path, "config.set('vehicle', 'id', 'NEW')")
    out = cfg(tmp_path, "out(W)\nout(config.get('vehicle', 'id'))")
    assert out == [[], "NEW"]


def test_corrupt_config_falls_back_to_last_good(tmp_path):
    _write_good(tmp_path, [("vehicle", "id", "GEN1"), ("usr", "a", "1")])
    _write_good(tmp_path, [("vehicle", "id", "GEN2")])
    f = tmp_path / "ovms.cfg"
    f.write_bytes(f.read_bytes()[:-7])  # torn tail
    out = cfg(tmp_path, "out(W)\nout([config.get('vehicle', 'id'), config.get('usr', 'a')])")
    assert out[0][0].startswith("config: %s is corrupt (checksum mismatch), moved to" % f)
    assert out[0][1] == "config: booting on last-good config %s.bak (generation 1)" % f
    assert out[1] == ["GEN1", "1"]
    # the recovered config is written back as the main file: next boot is clean, last-good kept
    out = cfg(tmp_path, "out(W)\nout(config.get('vehicle', 'id'))")
    assert out == [[], "GEN1"]
    assert (tmp_path / "ovms.cfg.bak").exists()


def test_main_and_last_good_both_corrupt(tmp_path):
    _write_good(tmp_path, [("vehicle", "id", "GEN1")])
    _write_good(tmp_path, [("vehicle", "id", "GEN2")])
    (tmp_path / "ovms.cfg").write_bytes(b"junk")
    (tmp_path / "ovms.cfg.bak").write_bytes(b"more junk")
    out = cfg(tmp_path, "out(W)\nout(config.get('vehicle', 'id'))")
    w = out[0]
    assert "is corrupt (bad header)" in w[0]
    assert w[1].startswith("config: last-good copy %s is corrupt too" % (tmp_path / "ovms.cfg.bak"))
    assert w[2] == "config: booting on defaults"
    assert out[1] == ""


def test_corrupt_copies_are_bounded(tmp_path):
    for n in range(6):
        (tmp_path / "ovms.cfg").write_bytes(b"junk %d" % n)
        out = cfg(tmp_path, "out(W)")
        assert "corrupt" in out[0][0]
    names = sorted(os.listdir(tmp_path))
    assert names == ["ovms.cfg.corrupt-1", "ovms.cfg.corrupt-2", "ovms.cfg.corrupt-3"]
    assert (tmp_path / "ovms.cfg.corrupt-3").read_bytes() == b"junk 5"


def test_invalid_stored_value_uses_default_and_is_reported(tmp_path):
    # a hand-edited (checksum-valid) file with an out-of-range value: reported, default used, kept
    _write_good(tmp_path, [("server.v3", "port", "8883"), ("password", "module", "pw")])
    out = cfg(tmp_path, """
config._data['server.v3']['port'] = '99999'
config._data['password']['module'] = 'x' * 99
config.save()
""")
    out = cfg(tmp_path, "out(W)\nout([config.get('server.v3', 'port'), config.display('server.v3', 'port')])")
    assert out[0] == ["config: stored password module ignored, default used: invalid secret",
                      "config: stored server.v3 port ignored, default used: "
                      "Invalid value '99999' for server.v3 port: expected an integer 0..65535"]
    assert out[1] == [0, "99999"]


def test_unreadable_store_is_never_overwritten(tmp_path):
    # an unexpected failure while loading (here: MemoryError) boots on defaults but must not
    # write over the files it could not read
    _write_good(tmp_path, [("vehicle", "id", "KEEP")])
    before = (tmp_path / "ovms.cfg").read_bytes()
    out = cfg(tmp_path, """
import sys
class Boom:
    def run(self):
        raise MemoryError
sys.modules['ovms.config.recover'] = Boom()
out(config.load())
out(config.get('vehicle', 'id'))
try:
    config.set('vehicle', 'id', 'OTHER')
except OSError as e:
    out(str(e))
out('ovms.config.recover' in sys.modules)
""")
    assert out[0] == ["config: load failed (MemoryError()), booting on defaults, config is read-only until reboot"]
    assert out[1] == ""
    assert "read-only until reboot" in out[2]
    assert out[3] is False
    assert (tmp_path / "ovms.cfg").read_bytes() == before


# ---- RAM ----------------------------------------------------------------------------------

def test_ram_cost(tmp_path):
    """Resident heap after import + load of 30 values (compiled .mpy as on the device)."""
    lib = tmp_path / "lib" / "ovms"
    (lib / "config").mkdir(parents=True)
    import subprocess
    for m in ("__init__", "fsutil", "config/__init__", "config/schema", "config/recover"):
        subprocess.run([MPY_CROSS, "-o", str(lib / (m + ".mpy")), os.path.join(LIB, "ovms", m + ".py")],
                       check=True)
    store = tmp_path / "store"
    run_mpy("from ovms import config\nconfig.init(%r)\n"
            "config.update([('usr', 'k%%d' %% i, 'value %%d' %% i) for i in range(30)])" % str(store),
            path=(str(tmp_path / "lib"),))
    r = run_mpy("""
import gc
import ovms
gc.collect()
m0 = gc.mem_free()
from ovms import config
gc.collect()
m1 = gc.mem_free()
w = config.init(%r)
assert w == [], w
gc.collect()
m2 = gc.mem_free()
print(m0 - m1, m1 - m2)
""" % str(store), path=(str(tmp_path / "lib"),))
    code, data = map(int, r.stdout.split())
    print("config RAM: code %d B, loaded 30 values %d B" % (code, data))
    # 64-bit unix port (pointers twice the ESP32's): generous bounds that still catch a regression
    assert code < 14000 and data < 6000
