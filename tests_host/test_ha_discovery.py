"""Home Assistant MQTT discovery from the module (ovms.v3.hadisc) on the micropython binary
against a real mosquitto: payloads checked with Home Assistant's discovery rules (written
here: abbreviations, required keys, device and state classes per component, units per
device class), announced only when changed (CRC in flash), removed when gone, again on HA's
birth message."""
import json
import time

from test_mqtt_kit import broker, dev_factory, peers  # noqa: F401
from test_server_v3 import PFX, device

HA = "homeassistant/"

# Home Assistant's abbreviations (homeassistant/components/mqtt/abbreviations.py) for the keys
# the module uses, and the device ones
ABBR = {"avty": "availability", "avty_mode": "availability_mode", "cmd_t": "command_topic",
        "dev": "device", "dev_cla": "device_class", "ent_cat": "entity_category",
        "name": "name", "obj_id": "object_id", "pl_avail": "payload_available",
        "pl_not_avail": "payload_not_available", "pl_off": "payload_off", "pl_on": "payload_on",
        "pl_prs": "payload_press", "stat_cla": "state_class", "stat_t": "state_topic",
        "t": "topic", "uniq_id": "unique_id", "json_attr_t": "json_attributes_topic",
        "src_type": "source_type", "unit_of_meas": "unit_of_measurement",
        "val_tpl": "value_template", "cmd_tpl": "command_template", "min": "min", "max": "max",
        "step": "step", "mode": "mode"}
DEV_ABBR = {"ids": "identifiers", "name": "name", "mf": "manufacturer", "mdl": "model",
            "sw": "sw_version"}
SENSOR_CLASSES = {"battery", "voltage", "current", "power", "energy", "temperature", "distance",
                  "speed", "pressure", "duration", "timestamp", "signal_strength", "frequency"}
BINARY_CLASSES = {"battery_charging", "plug", "power", "running", "light", "safety", "heat",
                  "cold", "problem", "connectivity", "door", "lock"}
# units Home Assistant accepts per sensor device class (a subset: the ones that can occur)
UNITS = {"battery": {"%"}, "voltage": {"V", "mV"}, "current": {"A", "mA"},
         "power": {"W", "kW"}, "energy": {"Wh", "kWh"}, "temperature": {"°C", "°F"},
         "distance": {"km", "m", "mi"}, "speed": {"km/h", "m/s", "mph"},
         "pressure": {"kPa", "bar", "psi", "hPa"}, "duration": {"s", "min", "h", "d"},
         "signal_strength": {"dBm", "dB"}}
STATE_CLASSES = {"measurement", "total", "total_increasing"}


def check_config(component, cfg):
    """Home Assistant's discovery schema rules, as far as the module's entities use them."""
    unknown = set(cfg) - set(ABBR)
    assert not unknown, ("not an abbreviation the module should use", unknown)
    assert cfg["uniq_id"] and cfg["name"]
    if "dev" in cfg:
        assert set(cfg["dev"]) <= set(DEV_ABBR) and cfg["dev"]["ids"]
    for a in cfg.get("avty", []):
        assert set(a) <= {"t", "pl_avail", "pl_not_avail", "val_tpl"} and a["t"]
    if "avty_mode" in cfg:
        assert cfg["avty_mode"] in ("all", "any", "latest")
    if "ent_cat" in cfg:
        assert cfg["ent_cat"] in ("diagnostic", "config")
    if component == "sensor":
        assert cfg["stat_t"]
        dc = cfg.get("dev_cla")
        assert dc is None or dc in SENSOR_CLASSES, dc
        sc = cfg.get("stat_cla")
        assert sc is None or sc in STATE_CLASSES, sc
        if dc in UNITS:
            assert cfg.get("unit_of_meas") in UNITS[dc], (cfg["name"], dc, cfg.get("unit_of_meas"))
        if dc == "energy":
            assert sc in ("total", "total_increasing"), cfg["name"]   # HA refuses measurement
        if dc == "timestamp":
            assert sc is None and "val_tpl" in cfg
        if sc:
            assert "unit_of_meas" in cfg or dc is None, cfg["name"]
    elif component == "binary_sensor":
        assert cfg["stat_t"] and cfg.get("pl_on") and cfg.get("pl_off")
        dc = cfg.get("dev_cla")
        assert dc is None or dc in BINARY_CLASSES, dc
        assert "unit_of_meas" not in cfg and "stat_cla" not in cfg
    elif component == "button":
        assert cfg["cmd_t"] and cfg["pl_prs"]
    elif component == "number":
        assert cfg["cmd_t"] and cfg["min"] < cfg["max"] and cfg.get("mode", "auto") in ("auto", "box", "slider")
    elif component == "device_tracker":
        assert cfg["json_attr_t"] and cfg.get("src_type") in ("gps", "router", "bluetooth", "bluetooth_le")
    else:
        raise AssertionError("component %s" % component)


def wait_ha(d, pred=lambda h: h[0] > 0, timeout=15):
    """The server's last discovery result (announced, removed, bytes), once pred holds (the
    announcement runs 5 s after a connect)."""
    end = time.time() + timeout
    while True:
        h = tuple(d.call("return srv.ha"))
        if pred(h) or time.time() > end:
            return h
        time.sleep(0.5)


def configs(peer):
    out = {}
    for m in peer.all():
        if m[0].startswith(HA) and m[0].endswith("/config"):
            out[m[0]] = json.loads(m[1]) if m[1] else None
    return out


SET = """
metrics.set("v.b.soc", 55.5)
metrics.set("v.b.voltage", 356.7)
metrics.set("v.b.current", -1.5)
metrics.set("v.b.power", 12.5)
metrics.set("v.b.temp", 21.0)
metrics.set("v.b.energy.recd.total", 1234.5)
metrics.set("v.p.odometer", 123456.7)
metrics.set("v.p.speed", 50)
metrics.set("v.e.locked", True)
metrics.set("v.d.fl", False)
metrics.set("v.c.charging", False)
metrics.set("v.e.on", True)
metrics.set("v.c.state", "stopped")
metrics.set("m.time.utc", 1701569671)
metrics.set("m.freeram", 50000)
metrics.set("v.p.latitude", 52.123456)
metrics.set("v.p.longitude", 4.654321)
metrics.set("v.p.gpshdop", 0.9)
"""


def test_discovery_entities_follow_home_assistant_rules(broker, dev_factory, peers, tmp_path):
    peer = peers(broker.port, subs=(HA + "#", PFX + "metric/#", PFX + "ha/#"))
    peer.settle()
    d = device(dev_factory, tmp_path, broker.port)
    d.call(SET + "await start()")
    wait_ha(d)
    time.sleep(0.5)
    got = configs(peer)
    byname = {}
    for topic, cfg in got.items():
        comp, node, obj, _ = topic[len(HA):].split("/")
        assert node == "ovms_car1" and obj == cfg["uniq_id"][len(node) + 1:]
        check_config(comp, cfg)
        byname[cfg["name"]] = (comp, cfg)
    # one device, announced in full once, the others refer to it by its identifiers
    full = [c for _, c in byname.values() if "mf" in c.get("dev", {})]
    assert len(full) == 1 and full[0]["dev"]["name"] == "CAR1"
    assert all(c["dev"]["ids"] == full[0]["dev"]["ids"] for _, c in byname.values())
    comp, soc = byname["v.b.soc"]
    assert comp == "sensor" and soc["dev_cla"] == "battery" and soc["unit_of_meas"] == "%"
    assert soc["stat_t"] == PFX + "metric/v/b/soc"      # the OVMS topic itself, no copy
    assert soc["stat_cla"] == "measurement"
    assert {a["t"] for a in soc["avty"]} == {PFX + "metric/s/v3/connected", PFX + "metric/s/v3/stale"}
    assert soc["avty_mode"] == "all"
    assert byname["v.p.odometer"][1]["stat_cla"] == "total_increasing"
    assert byname["v.p.odometer"][1]["dev_cla"] == "distance"
    assert byname["v.b.energy.recd.total"][1]["dev_cla"] == "energy"
    assert byname["v.p.speed"][1]["dev_cla"] == "speed"
    assert byname["v.b.temp"][1]["dev_cla"] == "temperature"
    comp, lock = byname["v.e.locked"]
    assert comp == "binary_sensor" and lock["dev_cla"] == "lock" and lock["pl_on"] == "no"
    assert byname["v.d.fl"][1]["dev_cla"] == "door"
    assert byname["v.c.charging"][1]["dev_cla"] == "battery_charging"
    assert byname["m.time.utc"][1]["dev_cla"] == "timestamp"
    assert byname["m.freeram"][1]["ent_cat"] == "diagnostic"
    assert "dev_cla" not in byname["v.c.state"][1]        # text
    comp, trk = byname["Position"]
    assert comp == "device_tracker" and trk["json_attr_t"] == PFX + "ha/position"
    pos = peer.wait(lambda m: m[0] == PFX + "ha/position", timeout=10)[1]
    assert json.loads(pos) == {"latitude": 52.123456, "longitude": 4.654321, "gps_accuracy": 4}
    # the availability template says offline for a metric the stale list names
    tpl = soc["avty"][1]["val_tpl"]
    assert "',v.b.soc,' in value" in tpl
    st = d.call("return srv.ha")
    assert st[0] == len(got) and st[2] > 0
    print("discovery: %d entities, %d bytes" % (st[0], st[2]))


def test_announced_once_removed_when_gone_again_on_birth(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    d.call(SET + 'metrics.set("v.b.12v.voltage", 12.6)\nawait start()')
    first = wait_ha(d)
    assert first[0] > 10
    d.kill()
    # same store, same metrics: nothing announced again (the CRC in flash matches)
    d2 = device(dev_factory, tmp_path, broker.port)
    d2.call(SET + 'metrics.set("v.b.12v.voltage", 12.6)\nawait start()')
    time.sleep(7)
    assert tuple(d2.call("return srv.ha")) == (0, 0, 0)
    d2.kill()
    # a metric gone (another vehicle, say): announced anew, the gone one removed
    peer = peers(broker.port, subs=(HA + "#",))
    peer.settle()
    d3 = device(dev_factory, tmp_path, broker.port)
    d3.call(SET + "await start()")
    n, removed, _ = wait_ha(d3, lambda h: h[1] > 0)
    assert removed == 1 and n <= 1      # only what changed (the full device may move)
    peer.wait(lambda m: m[0].endswith("/v_b_12v_voltage/config") and m[1] == b"", timeout=10)
    # Home Assistant restarts: its birth message makes the module announce again
    peer.clear()
    peer.publish(HA + "status", "online", qos=1)
    peer.wait(lambda m: m[0].endswith("/v_b_soc/config") and m[1], timeout=10)
    assert "Home Assistant discovery" in d3.call("return srv.status()")
    # any broker user can send births: a flood costs one announcement per minute at most
    time.sleep(1)
    peer.clear()
    for _ in range(20):
        peer.publish(HA + "status", "online", qos=1)
    time.sleep(8)
    assert not [m for m in peer.all() if m[0].endswith("/config")]
    d3.call("srv._ha_ft -= 60")         # a minute later: the waiting request, once
    peer.wait(lambda m: m[0].endswith("/v_b_soc/config") and m[1], timeout=10)
    time.sleep(2)
    assert len([m for m in peer.all() if m[0].endswith("/v_b_soc/config")]) == 1


def test_metrics_with_a_first_value_get_their_entity_alone(broker, dev_factory, peers, tmp_path):
    """The car wakes up after the connect: the metrics that get their first value are
    announced (only those), without a reconnect, and nothing is removed."""
    d = device(dev_factory, tmp_path, broker.port)
    d.call(SET + "await start()")
    first = wait_ha(d)
    assert first[0] > 10
    peer = peers(broker.port, subs=(HA + "#",))
    peer.settle()
    peer.clear()
    d.call('metrics.set("v.b.12v.voltage", 12.6)\nmetrics.set("v.c.voltage", 230)\n'
           'srv._ha_chk = metrics.uptime() - 60')      # the 30-s look, now
    n, removed, sent = wait_ha(d, lambda h: h != first)
    assert (n, removed) == (2, 0) and 0 < sent < 1500
    got = configs(peer)
    assert {c["name"] for c in got.values() if c} == {"v.b.12v.voltage", "v.c.voltage"}
    assert got[HA + "sensor/ovms_car1/v_b_12v_voltage/config"]["dev_cla"] == "voltage"


def test_discovery_can_be_switched_off(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port, extra=[("server.v3", "ha.discovery", False)])
    d.call(SET + "await start()")
    time.sleep(7)
    assert tuple(d.call("return srv.ha")) == (0, 0, 0)
