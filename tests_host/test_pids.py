"""tools/pids.py: WiCAN and ABRP profiles imported into vehicle directories (names, ids,
extends, errors), checked against a candump log, and an imported profile end to end on the
virtual device: a can-isotp ECU answers, the values arrive on MQTT under OVMS names."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import pids
import vehicles
from util import REPO, TOOLS, VDev

PROFILES = os.path.join(REPO, "tests_host", "data", "profiles")
KONA = os.path.join(PROFILES, "wican", "hyundai", "kona_bms.json")
HKMC = os.path.join(PROFILES, "abrp", "hkmc_bms.json")
KONA_LOG = os.path.join(REPO, "firmware", "vehicles", "kn", "logs",
                        "230112-7-2019-pcan-ccan-power-off-on-ready-off.log.gz")


def bms_0101():
    """A Kona/e-Niro BMS answer to 22 01 01 (62 01 01 + 59 data bytes)."""
    d = bytearray(59)
    d[4] = 0x48                                     # SOC 36 %
    d[9] = 0x80                                     # relay closed
    d[10:12] = (-13).to_bytes(2, "big", signed=True)     # -1.3 A
    d[12:14] = (3567).to_bytes(2, "big")            # 356.7 V
    d[14] = 21                                      # max module temperature
    d[23] = 200                                     # max cell 4.00 V
    d[25] = 195                                     # min cell 3.90 V
    d[29] = 126                                     # 12.6 V
    d[38:42] = bytes.fromhex("00012345")            # charged 7456.5 kWh
    return b"\x62\x01\x01" + bytes(d)


def bms_0105():
    d = bytearray(43)
    d[25:27] = (998).to_bytes(2, "big")             # SOH 99.8 %
    d[31] = 0x49                                    # display SOC 36.5 %
    return b"\x62\x01\x05" + bytes(d)


def test_wican_import_resolves_extends_and_names(tmp_path):
    v = pids.import_profile("wican", KONA, "KX", str(tmp_path / "kx"), warn=lambda m: None)
    assert v["name"] == "Hyundai: Kona Electric (test profile)"
    e = v["poll"][0]
    assert (e["tx"], e["rx"], e["request"]) == ("7E4", "7EC", "220101")   # from the base's pid_init
    assert v["poll"][1]["request"] == "220105"       # "2201057": the answer-count digit dropped
    vals = {k: x for p in v["poll"] for k, x in p["values"].items()}
    for name in ("v.b.soc", "v.b.current", "v.b.voltage", "v.b.12v.voltage", "v.b.soh",
                 "xkx.hv.c.v.max", "xkx.hv.c.v.min", "xkx.kwh.charged", "xkx.soc.display"):
        assert name in vals, name
    assert vals["xkx.hv.relay"]["type"] == "b"      # one bit: yes/no
    m = vehicles.compile_vehicle(str(tmp_path / "kx"))
    assert len(m["poll"]) == 2 and m["code"] == "KX"


def test_abrp_import_names_ids_and_ranges(tmp_path):
    v = pids.import_profile("abrp", HKMC, "HK", str(tmp_path / "hk"), warn=lambda m: None)
    vals = {k: (p["tx"], p["rx"], p["request"], x) for p in v["poll"] for k, x in p["values"].items()}
    assert set(vals) == {"v.b.soc", "v.b.current", "v.b.voltage", "xhk.kwh.charged",
                         "v.c.charging", "v.b.soh"}
    assert vals["v.b.soc"][:3] == ("7E4", "7EC", "220101")
    assert vals["v.b.soh"][2] == "220105"
    assert vals["v.b.current"][3]["valid"] == [-230.0, 230.0]
    vehicles.compile_vehicle(str(tmp_path / "hk"))


def test_mapping_overrides_and_leaves_out(tmp_path):
    mp = {"SOC": "xkx.b.soc.bms", "HV_C_V_MAX": "v.b.p.voltage.max", "KWH_CHARGED": None}
    v = pids.import_profile("wican", KONA, "KX", str(tmp_path / "kx"), mapping=mp, warn=lambda m: None)
    vals = {k for p in v["poll"] for k in p["values"]}
    assert "xkx.b.soc.bms" in vals and "v.b.p.voltage.max" in vals
    assert "v.b.soc" not in vals and "xkx.kwh.charged" not in vals


def test_unsupported_expression_is_an_error_naming_the_parameter(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"car_model": "X: Y", "init": "ATSH7E4;", "pids": [
        {"pid": "220101", "parameters": {"GOOD": "B10/2", "ODD": "B10 ** 2"}}]}))
    with pytest.raises(pids.ProfileError, match="parameter ODD.*B10 \\*\\* 2"):
        pids.import_profile("wican", str(p), "XY", str(tmp_path / "o"))
    warned = []
    v = pids.import_profile("wican", str(p), "XY", str(tmp_path / "o"), skip=True, warn=warned.append)
    assert list(v["poll"][0]["values"]) == ["xxy.good"] and "ODD" in warned[0]
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "pids.py"), "import", "--format", "wican",
                        str(p), "--code", "XY", "-o", str(tmp_path / "o2")], capture_output=True, text=True)
    assert r.returncode == 2 and "parameter ODD" in r.stderr


def test_29bit_and_raw_frame_abrp_profiles(tmp_path):
    p = tmp_path / "meb.json"
    p.write_text(json.dumps({
        "init_commands": {"command": ["ATSP7", "ATSH FC007B", "ATCP 17", "ATCAF0", "ATCRA17FE007B"]},
        "data_commands": {"command": ["03221E3B55555555"]},
        "voltage": {"equation": "((A*256)+B)/4", "command": "03221E3B55555555", "ecu": ""}}))
    v = pids.import_profile("abrp", str(p), "VW", str(tmp_path / "vw"), warn=lambda m: None)
    e = v["poll"][0]
    assert (e["tx"], e["rx"], e["request"], e.get("ext")) == ("17FC007B", "17FE007B", "221E3B", True)


def _candump(path):
    """A capture: requests on 7E4, the BMS answers on 7EC as ISO-TP frames, other traffic."""
    lines = []
    t = 100.0

    def frames(payload):
        if len(payload) <= 7:
            return [bytes([len(payload)]) + payload]
        out = [bytes([0x10 | len(payload) >> 8, len(payload) & 0xFF]) + payload[:6]]
        rest, sn = payload[6:], 1
        while rest:
            out.append(bytes([0x20 | sn & 0xF]) + rest[:7])
            rest, sn = rest[7:], sn + 1
        return out
    for req, ans in ((b"\x22\x01\x01", bms_0101()), (b"\x22\x01\x05", bms_0105())):
        lines.append("(%.6f) can0 7E4#%s" % (t, (bytes([len(req)]) + req).hex().upper()))
        lines.append("(%.6f) can0 545#0011223344556677" % (t + 0.001))
        for k, f in enumerate(frames(ans)):
            lines.append("(%.6f) can0 7EC#%s" % (t + 0.002 + k / 1000, f.hex().upper()))
            if k == 0:
                lines.append("(%.6f) can0 7E4#3000000000000000" % (t + 0.0025))
        t += 1
    path.write_text("\n".join(lines) + "\n")


def test_check_decodes_a_capture(tmp_path):
    log = tmp_path / "bms.log"
    _candump(log)
    out = []
    n = pids.check("wican", KONA, str(log), out=out.append)
    text = "\n".join(out)
    assert n == 11, text
    assert "220101 SOC = 36\n" in text + "\n" and "HV_A = -1.3" in text and "HV_V = 356.7" in text
    assert "SOH = 99.8" in text and "KWH_CHARGED = 7456.5" in text and "HV_RELAY = 1" in text
    out = []
    assert pids.check("abrp", HKMC, str(log), out=out.append) == 6
    assert "soc = 36" in "\n".join(out) and "soh = 99.8" in "\n".join(out)
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "pids.py"), "check", KONA, "--format", "wican",
                        "--log", str(log)], capture_output=True, text=True)
    assert r.returncode == 0 and "LV_V = 12.6" in r.stdout


@pytest.fixture
def kx_vehicle(tmp_path):
    vd = tmp_path / "kx"
    pids.import_profile("wican", KONA, "KX", str(vd), warn=lambda m: None)
    out = tmp_path / "built"
    return vehicles.build(str(vd), str(out), mpy=True)


def test_imported_profile_end_to_end_on_the_virtual_device(tmp_path, kx_vehicle, broker):
    pytest.importorskip("can")
    pytest.importorskip("isotp")
    from mqttpeer import Client
    from test_poller import Ecu
    root = tmp_path / "flash"
    answers = {b"\x22\x01\x01": bms_0101(), b"\x22\x01\x05": bms_0105()}
    with VDev(root, can_log=KONA_LOG) as d:         # the replayed bus: traffic, the car is there
        os.makedirs(root / "lib", exist_ok=True)
        shutil.copy(kx_vehicle, root / "lib")       # an imported vehicle deployed to /lib
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", d.pty, "provision",
                            "--wifi", "car", "wifipw", "--mqtt-host", "localhost", "--mqtt-port",
                            str(broker.tls_port), "--ca", broker.ca, "--type", "KX", "--id", "KX1"],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        with Ecu(d, 0x7E4, 0x7EC, lambda req: [(0, answers[req])] if req in answers else []):
            c = Client(broker, "ovms//KX1/")
            try:
                got = {}
                want = {"metric/v/b/soc": 36.0, "metric/v/b/current": -1.3, "metric/v/b/voltage": 356.7,
                        "metric/v/b/12v/voltage": 12.6, "metric/v/b/soh": 99.8,
                        "metric/xkx/hv/c/v/max": 4.0, "metric/xkx/kwh/charged": 7456.5,
                        "metric/xkx/hv/relay": "yes"}
                import time
                end = time.time() + 120
                while set(want) - set(got) and time.time() < end:
                    try:
                        t, v = c.q.get(timeout=1)
                    except Exception:
                        continue
                    k = t[len(c.prefix):]
                    if k in want:
                        got[k] = v
                missing = set(want) - set(got)
                assert not missing, (missing, got, d.console()[-3000:])
                for k, w in want.items():
                    assert (got[k] == w) if isinstance(w, str) else abs(float(got[k]) - w) < 1e-6, (k, got[k])
            finally:
                c.close()


SHIPPED = os.path.join(REPO, "firmware", "profiles")


def test_shipped_generic_obd_profile_agrees_with_the_built_in_one(tmp_path):
    """The shipped ABRP-format OBD-II profile, imported, decodes answers as the module's
    built-in generic profile (lib/ovms/poll/obd.py) does."""
    import importlib.util
    import pidexpr
    spec = importlib.util.spec_from_file_location("obd", os.path.join(REPO, "lib", "ovms", "poll", "obd.py"))
    obd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(obd)
    builtin = {}
    for e in obd.POLL:
        for m, start, size, kind, bit, scale, add in e[7]:
            builtin[m] = (e[4], start, size, scale, add)
    mp = json.load(open(os.path.join(SHIPPED, "obd2_generic.mapping.json")))
    v = pids.import_profile("abrp", os.path.join(SHIPPED, "obd2_generic.abrp.json"), "OB",
                            str(tmp_path / "ob"), mapping=mp, warn=lambda m: None)
    compared = 0
    for e in v["poll"]:
        assert (e["tx"], e["rx"]) == ("7DF", "7E8")
        req = bytes.fromhex(e["request"])
        for m, x in e["values"].items():
            if m not in builtin:
                continue
            breq, start, size, scale, add = builtin[m]
            assert breq == req, m
            for seed in range(50):
                data = bytes((seed * 37 + i * 11) & 0xFF for i in range(4))
                ans = bytes([req[0] + 0x40]) + req[1:] + data
                want = int.from_bytes(data[start:start + size], "big") * scale + add
                got = pidexpr.evaluate(pidexpr.parse(x["expr"], "abrp"), ans, len(req), "abrp")
                assert abs(got - want) < 1e-6, (m, data.hex(), got, want)
            compared += 1
    assert compared >= 6          # speed, rpm, ambient, 12 V, hybrid battery, odometer


def test_kona_profile_is_merged_into_kn():
    v = vehicles.compile_vehicle(os.path.join(REPO, "firmware", "vehicles", "kn"))
    polled = {x[0] for e in v["poll"] for x in e[7]}
    assert {"v.b.soh", "v.b.p.voltage.max", "v.b.p.voltage.min", "v.b.energy.recd.total",
            "v.b.energy.used.total", "xkn.b.module.1.temp", "xkn.b.relay"} <= polled
    broadcast = {m[0] for m in v["metrics"]}
    assert not polled & broadcast       # one source per metric: the DBC keeps what the car sends
    assert all((e[1], e[2]) == (0x7E4, 0x7EC) for e in v["poll"])
    # the shipped profile still imports to what kn holds
    out = []
    n = pids.check("wican", os.path.join(SHIPPED, "kona_eniro_bms.wican.json"), os.devnull, out=out.append)
    assert n == 0 and not out
