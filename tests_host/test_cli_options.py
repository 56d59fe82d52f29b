"""tools/ovms.py option parsing: shared options in either position, one meaning, clear errors;
the one topic-prefix function (OVMS v3 rule); --json replies as data."""
import importlib.util
import os

import pytest

from util import TOOLS

import cli_json
import cli_link

_spec = importlib.util.spec_from_file_location("ovms_host_cli_opts", os.path.join(TOOLS, "ovms.py"))
ovms_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ovms_cli)


def test_topic_prefix_is_the_ovms_v3_rule():
    assert cli_link.topic_prefix("alice", "CAR1") == "ovms/alice/CAR1/"
    assert cli_link.topic_prefix(None, "SIM1") == "ovms//SIM1/"      # as the module builds it
    assert cli_link.topic_prefix("", "SIM1") == "ovms//SIM1/"
    assert cli_link.topic_prefix("alice", None) == "ovms/alice/"
    assert cli_link.topic_prefix("alice", "CAR1", "my/car") == "my/car/"
    assert cli_link.topic_prefix("alice", "CAR1", "my/car/") == "my/car/"


def test_shell_and_ota_use_the_one_prefix_function(monkeypatch):
    # `ota push` once built ovms/SIM1/ while the module used ovms//SIM1/: both now use
    # cli_link.open_link, which builds the prefix with topic_prefix
    seen = []

    class FakeLink:
        def __init__(self, url, ca, user, password, prefix, timeout, cid_prefix="x"):
            seen.append(prefix)
            self.cid = "c"

        def subscribe(self, sub, h):
            pass

        def connect(self):
            return self

    monkeypatch.setattr(cli_link, "Link", FakeLink)
    import cli_ota
    a = ovms_cli.parse(["--mqtt", "mqtt://h", "--id", "SIM1", "ota", "status"])
    cli_ota.Link(a)
    a = ovms_cli.parse(["--mqtt", "mqtt://h", "--id", "SIM1", "shell", "stat"])
    cli_link.open_link(a)
    a = ovms_cli.parse(["ota", "status", "--mqtt", "mqtt://h", "--user", "u", "--id", "SIM1"])
    cli_ota.Link(a)
    assert seen == ["ovms//SIM1/", "ovms//SIM1/", "ovms/u/SIM1/"]


@pytest.mark.parametrize("argv", [
    ["--ca", "c.pem", "--id", "V", "--user", "u", "--password", "p", "-p", "/dev/x",
     "provision", "--type", "RV"],
    ["provision", "--ca", "c.pem", "--id", "V", "--user", "u", "--password", "p", "-p", "/dev/x",
     "--type", "RV"],
    ["-p", "/dev/x", "--ca", "c.pem", "provision", "--mqtt-user", "u", "--mqtt-password", "p",
     "--id", "V", "--type", "RV"],
])
def test_shared_options_mean_the_same_before_or_after_the_subcommand(argv):
    a = ovms_cli.parse(argv)
    assert (a.port, a.ca, a.id, a.user, a.password, a.prov_type) == \
        ("/dev/x", "c.pem", "V", "u", "p", "RV")


def test_options_after_nested_subcommands_and_defaults():
    a = ovms_cli.parse(["ota", "push", "--key-file", "k", "--mqtt", "mqtts://h", "--ca", "c",
                        "--id", "V", "--timeout", "3", "--json"])
    assert (a.mqtt, a.ca, a.id, a.timeout, a.json, a.key_file) == ("mqtts://h", "c", "V", 3.0,
                                                                   True, "k")
    a = ovms_cli.parse(["--port", "P", "shell", "stat"])
    assert (a.timeout, a.json, a.ca, a.mqtt) == (10.0, False, None, None)


def test_conflicting_or_ambiguous_options_are_errors(capsys):
    assert ovms_cli.main(["--ca", "a.pem", "-p", "P", "provision", "--ca", "b.pem"]) == 2
    assert "--ca given twice with different values" in capsys.readouterr().err
    # the same value twice is fine
    a = ovms_cli.parse(["--id", "X", "shell", "--id", "X", "stat"])
    assert a.id == "X"
    for argv in (["--vehicle", "X", "--mqtt", "mqtt://h", "shell", "stat"],
                 ["-p", "P", "provision", "--vehicle", "RV"]):
        assert ovms_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "--vehicle" in err and "ambiguous" in err and "--id" in err and "--type" in err
    # no abbreviations: --pass is not --password
    assert ovms_cli.main(["--mqtt", "mqtt://h", "--pass", "x", "shell", "stat"]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["shell", "stat"], "give -p/--port PORT (serial) or --mqtt URL"),
    (["-p", "P", "--mqtt", "mqtt://h", "--id", "X", "shell", "stat"], "not both"),
    (["--mqtt", "mqtt://h", "provision", "--id", "X"], "provision needs -p/--port"),
    (["--mqtt", "mqtt://h", "-p", "P", "deploy"], "serial port only"),
    (["-p", "P", "ota", "status"], "ota status needs --mqtt"),
    (["--mqtt", "mqtt://h", "-p", "P", "ota", "status"], "MQTT only"),
])
def test_each_command_names_the_link_it_needs(argv, msg, capsys):
    assert ovms_cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_json_of_data_replies():
    text = ("v.b.soc                                  [     3s ] 85.5%\n"
            "v.p.odometer                             [    12sS] 25088.06km\n"
            "a.very.long.metric.name.that.is.longer.than.forty.chars [     0s ] on\n")
    r = cli_json.reply("metrics list", text)
    assert r["ok"] and not r["truncated"]
    assert r["data"] == [
        {"name": "v.b.soc", "age": 3, "stale": False, "value": "85.5%"},
        {"name": "v.p.odometer", "age": 12, "stale": True, "value": "25088.06km"},
        {"name": "a.very.long.metric.name.that.is.longer.than.forty.chars", "age": 0,
         "stale": False, "value": "on"}]
    r = cli_json.reply("config list server.v3",
                       "server.v3 (readable writeable)\n  port: 8883\n  server: localhost\n  tls: yes")
    assert r["data"] == {"server.v3": {"readable": True, "values": {
        "port": "8883", "server": "localhost", "tls": "yes"}}}
    r = cli_json.reply("config list", "auto (readable writeable)\npassword (writeable)")
    assert r["data"] == {"auto": {"readable": True, "values": {}},
                         "password": {"readable": False, "values": {}}}
    assert cli_json.reply("metrics get v.b.soc", "(undefined)")["data"] is None
    r = cli_json.reply("config get x y", "Error: Unknown parameter 'x'")
    assert not r["ok"] and "data" not in r
    r = cli_json.reply("stat", "line\n[output truncated]")
    assert r["truncated"] and "data" not in r


def test_ota_status_json(monkeypatch, capsys):
    import json
    import cli_ota
    st = {"op": "status", "running": "1.2.3", "slot": "a", "trial": False, "staged": None}

    class FakeOtaLink:
        def __init__(self, args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(cli_ota, "Link", FakeOtaLink)
    monkeypatch.setattr(cli_ota, "_status", lambda link, timeout: st)
    assert ovms_cli.main(["--mqtt", "mqtt://h", "--id", "V", "ota", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == st
    assert ovms_cli.main(["--mqtt", "mqtt://h", "--id", "V", "ota", "status"]) == 0
    assert "Running:  1.2.3 (slot a)" in capsys.readouterr().out
