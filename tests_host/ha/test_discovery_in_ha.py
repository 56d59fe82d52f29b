"""The module's MQTT discovery in a real Home Assistant: the virtual device (sim) announces
itself, Home Assistant's own MQTT integration creates the device and typed entities, states
follow the OVMS topics, buttons and numbers run shell commands, staleness and a power cut make
entities unavailable."""
import asyncio
import json
import logging
from datetime import datetime

import pytest
from homeassistant.components import mqtt
from homeassistant.core import callback
from homeassistant.const import EntityCategory
from homeassistant.helpers import device_registry as dr, entity_registry as er

from conftest import until, watch_module

HA = "homeassistant/"


async def connect(hass, sim):
    """Home Assistant's MQTT integration on the sim's broker, with what it has seen: retained
    discovery configs and the module's metric topics."""
    entry, metrics, unsub_metrics = await watch_module(hass, sim, True)
    seen = {"configs": {}, "metrics": metrics, "responses": {}}

    @callback
    def on_config(msg):
        seen["configs"][msg.topic] = json.loads(msg.payload) if msg.payload else None

    @callback
    def on_response(msg):
        seen["responses"][msg.topic.rsplit("/", 1)[1]] = msg.payload
    unsub = [unsub_metrics, await mqtt.async_subscribe(hass, HA + "+/%s/+/config" % sim.node, on_config),
             await mqtt.async_subscribe(hass, sim.prefix + "client/homeassistant/response/+", on_response)]
    # the announcement runs 5 s after the module's connect; configs are retained
    await until(lambda: len(seen["configs"]) > 20, 120, "discovery configs")
    n = 0
    while n != len(seen["configs"]):    # until the announcement is over (2 s without a config)
        n = len(seen["configs"])
        await asyncio.sleep(2)
    seen["entry"], seen["unsub"] = entry, unsub
    return seen


async def disconnect(hass, seen):
    for u in seen["unsub"]:
        u()
    assert await hass.config_entries.async_unload(seen["entry"].entry_id)
    await hass.async_block_till_done()


@pytest.fixture
async def seen(hass, sim):
    """Home Assistant's MQTT integration on the sim's broker for one test (connect())."""
    got = await connect(hass, sim)
    yield got
    await disconnect(hass, got)


def entity_ids(hass, seen):
    """{config topic: entity id}: the entity Home Assistant made of each announced config."""
    reg = er.async_get(hass)
    out = {}
    for topic, cfg in seen["configs"].items():
        if cfg:
            out[topic] = reg.async_get_entity_id(topic.split("/")[1], "mqtt", cfg["uniq_id"])
    return out


def named(hass, seen):
    """{entity name (the metric's, or the command's label): entity id}."""
    return {seen["configs"][t]["name"]: e for t, e in entity_ids(hass, seen).items()}


async def test_home_assistant_makes_a_typed_device_from_the_announcement(hass, sim, seen, caplog):
    ids = await until(lambda: (lambda m: m if all(m.values()) else None)(entity_ids(hass, seen)),
                      30, "an entity for every config")
    # Home Assistant took every config: no schema error, no refused value (the configs
    # arrived while the fixture connected)
    bad = [r.getMessage() for r in caplog.get_records("setup") + caplog.get_records("call")
           if r.name.startswith("homeassistant") and r.levelno >= logging.WARNING]
    assert not bad, bad
    comps = {t.split("/")[1] for t in ids}
    assert comps == {"sensor", "binary_sensor", "button", "number", "device_tracker"}, comps
    reg = er.async_get(hass)
    devs = {reg.async_get(e).device_id for e in ids.values()}
    assert len(devs) == 1           # one device for the module and the vehicle
    dev = dr.async_get(hass).async_get(devs.pop())
    await until(lambda: "m.version" in seen["metrics"], 30, "m.version")
    assert (dev.name, dev.manufacturer, dev.model) == ("HA1", "micro-ovms", "Kona test vehicle with commands")
    assert dev.sw_version == seen["metrics"]["m.version"]
    assert any(i[0] == "mqtt" and i[1].startswith("micro-ovms-") for i in dev.identifiers)

    by_metric = named(hass, seen)

    def st(name):
        return hass.states.get(by_metric[name])

    # vehicle values typed as Home Assistant knows them, states = the OVMS topics' values
    await until(lambda: st("v.b.soc").state not in ("unknown", "unavailable"), 60, "v.b.soc state")
    want = {"v.b.soc": ("battery", "%"), "v.b.voltage": ("voltage", "V"),
            "v.b.current": ("current", "A"), "v.b.12v.voltage": ("voltage", "V"),
            "v.b.temp": ("temperature", "°C"), "v.p.odometer": ("distance", "km"),
            "v.p.speed": ("speed", "km/h"), "m.net.sq": ("signal_strength", "dBm")}
    for name, (dc, unit) in want.items():
        s = st(name)
        assert s.attributes.get("device_class") == dc, (name, s.attributes)
        assert s.attributes.get("unit_of_measurement") == unit, (name, s.attributes)
        if s.state not in ("unknown", "unavailable"):
            pub = seen["metrics"][name]
            assert s.state and pub and abs(float(s.state) - float(pub)) < 1e-6, (name, s.state, pub)
    assert st("v.p.odometer").attributes["state_class"] == "total_increasing"
    assert st("v.b.soc").attributes["state_class"] == "measurement"
    # the clock as a timestamp, in UTC as OVMS v3 writes it
    utc = st("m.time.utc")
    assert utc.attributes["device_class"] == "timestamp"
    text = seen["metrics"]["m.time.utc"]
    assert datetime.fromisoformat(utc.state).strftime("%Y-%m-%d %H:%M:%S UTC") == text
    # yes/no metrics as binary sensors with their classes
    pilot = st("v.c.pilot")
    assert pilot.attributes["device_class"] == "plug"
    assert pilot.state == {"yes": "on", "no": "off"}[seen["metrics"]["v.c.pilot"]]
    # module health in the diagnostic category
    for name in ("m.freeram", "m.net.sq", "m.can0.frames", "m.monotonic"):
        assert reg.async_get(by_metric[name]).entity_category == EntityCategory.DIAGNOSTIC, name
    assert reg.async_get(by_metric["v.b.soc"]).entity_category is None
    # the position as a device tracker with the module's coordinates
    trk = hass.states.get(ids[HA + "device_tracker/%s/position/config" % sim.node])
    await until(lambda: "v.p.latitude" in seen["metrics"], 30, "a position")
    await until(lambda: hass.states.get(trk.entity_id).attributes.get("latitude") is not None, 30,
                "tracker position")
    trk = hass.states.get(trk.entity_id)
    assert abs(trk.attributes["latitude"] - float(seen["metrics"]["v.p.latitude"])) < 1e-4
    assert abs(trk.attributes["longitude"] - float(seen["metrics"]["v.p.longitude"])) < 1e-4
    assert trk.attributes["source_type"] == "gps"


async def test_buttons_and_numbers_run_the_vehicle_commands(hass, sim, seen):
    by_name = named(hass, seen)
    answers = {"Lock": ("cmd_lock", "Vehicle locked"), "Unlock": ("cmd_unlock", "Vehicle unlocked"),
               "Climate on": ("cmd_climatecontrol_on", "Climate Control on"),
               "Climate off": ("cmd_climatecontrol_off", "Climate Control off"),
               "Start charging": ("cmd_charge_start", "Charge has been started"),
               "Stop charging": ("cmd_charge_stop", "Charge has been stopped")}
    for label, (obj, text) in answers.items():
        assert by_name[label].startswith("button."), label
        await hass.services.async_call("button", "press", {"entity_id": by_name[label]}, blocking=True)
        got = await until(lambda: seen["responses"].pop(obj, None), 30, "answer to " + label)
        assert got == text, (label, got)
    limit = by_name["Charge limit"]
    s = hass.states.get(limit)
    assert (s.attributes["min"], s.attributes["max"], s.attributes["unit_of_measurement"]) == (10, 100, "%")
    await hass.services.async_call("number", "set_value", {"entity_id": limit, "value": 80}, blocking=True)
    got = await until(lambda: seen["responses"].pop("cmd_charge_limit", None), 30, "charge limit")
    assert got == "Charge limit set to 80%"
    with pytest.raises(Exception):  # Home Assistant keeps a value out of the vehicle's range away
        await hass.services.async_call("number", "set_value", {"entity_id": limit, "value": 5},
                                       blocking=True)


async def test_stale_values_and_a_power_cut_make_entities_unavailable_until_back(hass, sim, seen):
    by_metric = named(hass, seen)
    soc, volt = by_metric["v.b.soc"], by_metric["v.b.voltage"]
    await until(lambda: hass.states.get(soc).state != "unavailable", 30, "soc available")
    # the module's stale list names v.b.soc: that entity alone becomes unavailable
    await mqtt.async_publish(hass, sim.prefix + "metric/s/v3/stale", ",v.b.soc,v.p.speed,")
    await until(lambda: hass.states.get(soc).state == "unavailable", 10, "soc stale")
    assert hass.states.get(volt).state != "unavailable"
    await mqtt.async_publish(hass, sim.prefix + "metric/s/v3/stale", ",")
    await until(lambda: hass.states.get(soc).state != "unavailable", 10, "soc fresh again")
    # power gone: the broker publishes the module's will, every vehicle entity unavailable
    conn = by_metric["s.v3.connected"]
    assert hass.states.get(conn).state == "on"
    sim.power_cut()
    await until(lambda: hass.states.get(conn).state == "off", 30, "connected off")
    for e in (soc, volt, by_metric["m.freeram"], by_metric["Position"]):
        assert hass.states.get(e).state == "unavailable", e
    # powered on again: back, with values (the retained ones, then fresh ones)
    await until(lambda: hass.states.get(conn).state == "on", 120, "connected again")
    await until(lambda: hass.states.get(soc).state not in ("unavailable", "unknown"), 60, "soc back")
    assert hass.states.get(volt).state != "unavailable"
