"""Serial CLI (tools/cli_serial.py) logic against the real firmware code on the micropython binary,
through an exec double that stands in for the raw REPL (the end-to-end path over the virtual
device's pty is tested in test_cli_serial.py)."""
import os
import subprocess

import pytest

import importlib.util

import cli_serial
from util import LIB, MICROPYTHON, TOOLS, run_mpy

# tools/ovms.py (the host command), loaded by path: "ovms" is also the device package's name
_spec = importlib.util.spec_from_file_location("ovms_host_cli", os.path.join(TOOLS, "ovms.py"))
ovms_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ovms_cli)

SERVER = """
import sys
sys.path[:0] = [%r]
from ovms import config
config._root = %r
if %r:
    config.load()
g = {'__name__': '__main__'}
inp = sys.stdin.buffer
out = sys.stdout
while True:
    n = inp.readline()
    if not n:
        break
    code = inp.read(int(n)).decode()
    try:
        exec(code, g)
        out.write('\\x04\\x04')
    except BaseException as e:
        out.write('\\x04')
        sys.print_exception(e, out)
        out.write('\\x04')
"""


class ExecDouble:
    """Device double: a micropython process that execs what the CLI sends, with the raw REPL's
    contract (stdout, then the exception text if one was raised; globals kept between execs).
    Heap 256K: here lib/ is compiled from source on the device double, the device runs .mpy."""

    def __init__(self, root, booted=True, app=False):
        code = SERVER % (LIB, str(root), booted)
        self.was_running = app  # Ctrl-C interrupted the firmware (rather than an idle REPL)
        self.p = subprocess.Popen([MICROPYTHON, "-X", "heapsize=256K", "-c", code],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.sent = []
        self.closed = None

    def exec(self, code):
        self.sent.append(code)
        b = code.encode()
        self.p.stdin.write(b"%d\n" % len(b) + b)
        self.p.stdin.flush()
        parts = []
        for _ in range(2):
            buf = b""
            while not buf.endswith(b"\x04"):
                c = self.p.stdout.read(1)
                assert c, "device double died"
                buf += c
            parts.append(buf[:-1].decode())
        if parts[1]:
            raise cli_serial.LinkError("device error: " + parts[1].strip())
        return parts[0]

    def close(self, reset=False):
        self.closed = "reset" if reset else "closed"
        self.p.stdin.close()
        self.p.wait(timeout=10)
        return "soft reboot\n" if reset else ""


@pytest.fixture
def dev(tmp_path, monkeypatch):
    """Run `ovms.py --port X ...` against an ExecDouble; returns run(argv) -> (rc, stdout, stderr)."""
    root = tmp_path / "store"
    state = {}

    def opener(port, timeout):
        state["dev"] = ExecDouble(root)
        return state["dev"]

    monkeypatch.setattr(cli_serial, "open_device", opener)
    monkeypatch.setattr(cli_serial, "CA_PATH", str(root / "ca.pem"))
    monkeypatch.setattr(cli_serial, "OTA_PUB_PATH", str(root / "ota.pub"))

    def run(argv, capsys=None):
        rc = ovms_cli.main(["--port", "/dev/null"] + argv)
        return rc

    run.state = state
    run.root = root
    return run


def cfg_values(root, pairs):
    code = "from ovms import config\nconfig.init(%r)\n" % str(root)
    code += "print(repr([config.get(p, i) for p, i in %r]))" % (pairs,)
    return eval(run_mpy(code).stdout)


def test_quote_round_trips_through_the_device_shell():
    words = ["plain", "two words", 'q"uote', "back\\slash", "", "tab\there", "Zürich"]
    line = cli_serial.command_line(words)
    r = run_mpy("from ovms import shell\nprint(repr(shell.split(%r)))" % line)
    assert eval(r.stdout) == words


def test_is_error():
    assert cli_serial.is_error("Error: Unknown parameter 'x'")
    assert cli_serial.is_error("Unrecognised command")
    assert cli_serial.is_error("Usage: config set <param> <instance> <value>")
    assert not cli_serial.is_error("Parameter has been set.")
    assert not cli_serial.is_error("vehicle (readable writeable)\n  id: Error")


def test_shell_command(dev, capsys):
    rc = dev(["shell", "config set vehicle id DEMO"])
    out = capsys.readouterr().out
    assert (rc, out) == (0, "Parameter has been set.\n")
    # serial console = physical access = secure session (config set is a secure command)
    assert dev.state["dev"].closed == "closed"
    rc = dev(["shell", "config list vehicle"])
    out, err = capsys.readouterr()
    assert rc == 0 and "vehicle (readable writeable)" in out and "  id: DEMO" in out, err
    rc = dev(["shell", "no such command"])
    out = capsys.readouterr().out
    assert rc == 1 and out.startswith("Unrecognised command")


def test_interactive_shell_keeps_one_session(dev, capsys, monkeypatch):
    lines = iter(["config set vehicle id ONE", "", "disable", "config set vehicle id TWO", "enable",
                  "config get vehicle id", "exit", "never reached"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    rc = dev(["shell"])
    out = capsys.readouterr().out
    # the secure mode left with `disable` stays off for the next line of the same session
    assert out.splitlines() == ["Parameter has been set.", "Secure mode disabled",
                                "Error: Secure command requires 'enable' mode", "Secure mode",
                                "ONE"]
    assert rc == 0


def test_config_set_get_list_rm(dev, capsys):
    assert dev(["config", "set", "server.v3", "server", "mqtt.example.org"]) == 0
    assert dev(["config", "set", "wifi.ssid", "My Home Net", 'p "a" ss\\word']) == 0
    assert dev(["config", "set", "password", "server.v3", "hunter2"]) == 0
    capsys.readouterr()
    assert dev(["config", "get", "server.v3", "server"]) == 0
    assert capsys.readouterr().out == "mqtt.example.org\n"
    assert dev(["config", "list", "wifi.ssid"]) == 0
    out = capsys.readouterr().out
    assert "My Home Net: ********" in out and "ss" not in out.replace("wifi.ssid", "")
    assert dev(["config", "list", "password"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "server.v3: ********" in out
    # the stored values are exactly what was typed, spaces and quotes included
    assert cfg_values(dev.root, [("wifi.ssid", "My Home Net"), ("password", "server.v3")]) == \
        ['p "a" ss\\word', "hunter2"]
    # errors: non-zero exit and the device's message
    assert dev(["config", "set", "server.v3", "port", "huge"]) == 1
    assert capsys.readouterr().out == \
        "Error: Invalid value 'huge' for server.v3 port: expected an integer 0..65535\n"
    assert dev(["config", "set", "nope", "x", "1"]) == 1
    assert capsys.readouterr().out.startswith("Error: Unknown parameter 'nope'")
    assert dev(["config", "rm", "server.v3", "server"]) == 0
    assert dev(["config", "get", "server.v3", "server"]) == 0
    assert "mqtt.example.org" not in capsys.readouterr().out


def test_config_bad_local_usage(dev, capsys):
    assert dev(["config", "set", "vehicle", "id"]) == 2
    assert dev(["config", "frobnicate"]) == 2
    assert "usage: config list" in capsys.readouterr().err
    assert "dev" not in dev.state  # the device was not even opened


def test_provision(dev, capsys, tmp_path):
    from broker import make_ca
    ca = make_ca(str(tmp_path / "ca"))["ca.pem"]
    rc = dev(["provision", "--wifi", "Home Net", "wifipass1", "--mqtt-host", "127.0.0.1",
              "--mqtt-port", "18883", "--mqtt-user", "alice", "--mqtt-password", "s3cret",
              "--ca", ca, "--type", "NL", "--id", "LEAF1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert dev.state["dev"].closed == "reset"
    assert "s3cret" not in out and "wifipass1" not in out
    assert "password server.v3: ********" in out and "server.v3 tls: yes" in out
    assert "soft reset: done" in out
    with open(ca, "rb") as f:
        assert (dev.root / "ca.pem").read_bytes() == f.read()
    assert not (dev.root / "ca.pem.tmp").exists()
    assert cfg_values(dev.root, [
        ("wifi.ssid", "Home Net"), ("auto", "wifi.ssid.client"), ("server.v3", "server"),
        ("server.v3", "port"), ("server.v3", "user"), ("password", "server.v3"), ("server.v3", "tls"),
        ("server.v3", "ca"), ("vehicle", "type"), ("vehicle", "id")]) == [
        "wifipass1", "Home Net", "127.0.0.1", 18883, "alice", "s3cret", True,
        str(dev.root / "ca.pem"), "NL", "LEAF1"]


def test_provision_refuses_plain_mqtt_without_the_explicit_flag(dev, capsys):
    # with a password and no --ca, nothing is written and the device is not even opened
    for argv in (["--mqtt-host", "broker.local", "--password", "s3cret"],
                 ["--mqtt-host", "broker.local"],
                 ["--mqtt", "mqtt://broker.local:1883", "--mqtt-password", "s3cret"]):
        assert dev(["provision"] + argv) == 2
        err = capsys.readouterr().err
        assert "refusing to configure the broker without TLS" in err and "--insecure-plain-mqtt" in err
        assert "--ca" in err
    assert "dev" not in dev.state


def test_provision_plain_mqtt_only_when_asked(dev, capsys):
    assert dev(["provision", "--mqtt-host", "broker.local", "--insecure-plain-mqtt"]) == 0
    assert cfg_values(dev.root, [("server.v3", "server"), ("server.v3", "port"), ("server.v3", "tls")]) == \
        ["broker.local", 1883, False]


def test_provision_keeps_credentials_off_a_module_left_on_plain_mqtt(dev, capsys):
    assert dev(["provision", "--mqtt-host", "broker.local", "--insecure-plain-mqtt"]) == 0
    capsys.readouterr()
    # a password (or account) alone onto a module set to tls no: refused on the device, nothing written
    for argv in (["--password", "s3cret"], ["--user", "bob"]):
        assert dev(["provision"] + argv) == 1
        out = capsys.readouterr().out
        assert out.startswith("Error: the module is set to plain MQTT") and "--ca" in out
    assert cfg_values(dev.root, [("password", "server.v3"), ("server.v3", "user")]) == ["", ""]
    assert dev(["provision", "--password", "s3cret", "--insecure-plain-mqtt"]) == 0
    assert cfg_values(dev.root, [("password", "server.v3")]) == ["s3cret"]
    # the vehicle id or Wi-Fi alone carry no MQTT credentials: no flag needed
    assert dev(["provision", "--id", "CAR2"]) == 0


def test_provision_broker_url_and_options_in_either_position(dev, capsys, tmp_path):
    from broker import make_ca
    ca = make_ca(str(tmp_path / "ca"))["ca.pem"]
    # the shared options before the subcommand mean the same as after it (issue: a global --ca
    # was once silently not provision's)
    rc = ovms_cli.main(["--port", "/dev/null", "--ca", ca, "--user", "bob", "--password", "pw",
                        "--id", "CAR7", "provision", "--mqtt", "mqtts://mqtt.example:8884",
                        "--type", "RV"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert cfg_values(dev.root, [("server.v3", "server"), ("server.v3", "port"), ("server.v3", "tls"),
                                 ("server.v3", "user"), ("password", "server.v3"), ("vehicle", "id"),
                                 ("vehicle", "type")]) == \
        ["mqtt.example", 8884, True, "bob", "pw", "CAR7", "RV"]
    # mqtts:// without a CA, or two brokers: refused before the device is opened
    dev.state.clear()
    assert dev(["provision", "--mqtt", "mqtts://h:8883"]) == 2
    assert "mqtts:// needs --ca" in capsys.readouterr().err
    assert dev(["provision", "--mqtt", "mqtts://h", "--mqtt-host", "h2", "--ca", ca]) == 2
    assert "give the broker once" in capsys.readouterr().err
    assert "dev" not in dev.state


def test_provision_is_all_or_nothing(dev, capsys, tmp_path):
    assert dev(["provision", "--id", "KEEP"]) == 0
    capsys.readouterr()
    # one bad value (vehicle id too long): nothing is written, no reset, clear message
    rc = dev(["provision", "--mqtt-host", "new.host", "--insecure-plain-mqtt", "--id", "X" * 40,
              "--wifi", "net", "pw"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out == "Error: Invalid value for vehicle id: too long (40 > 32 chars)\n"
    assert dev.state["dev"].closed == "closed"
    assert cfg_values(dev.root, [("vehicle", "id"), ("server.v3", "server"), ("wifi.ssid", "net")]) == \
        ["KEEP", "", None]


def test_provision_refuses_a_bad_ca_before_touching_the_device(dev, capsys, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert dev(["provision", "--mqtt-host", "h", "--ca", str(bad)]) == 2
    assert "is not a PEM certificate" in capsys.readouterr().err
    assert dev(["provision", "--mqtt-host", "h", "--ca", str(tmp_path / "missing.pem")]) == 2
    assert "cannot read CA certificate" in capsys.readouterr().err
    assert "dev" not in dev.state


def test_provision_ota_pubkey(dev, capsys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pub").write_bytes(pub)
    assert dev(["provision", "--ota-pubkey", str(tmp_path / "k.pub")]) == 0
    assert (dev.root / "ota.pub").read_bytes() == pub
    # the key has one fixed place on the module: no config entry names it
    assert cfg_values(dev.root, [("ota", "pubkey")]) == [None]


def test_large_file_is_sent_in_chunks(dev, tmp_path):
    d = ExecDouble(tmp_path / "s")
    data = bytes(range(256)) * 20
    r = cli_serial.put_file(d, str(tmp_path / "s" / "sub" / "blob.bin"), data)
    d.close()
    assert r == "wrote %s %d" % (tmp_path / "s" / "sub" / "blob.bin", len(data))
    assert (tmp_path / "s" / "sub" / "blob.bin").read_bytes() == data
    assert sum(1 for c in d.sent if c.startswith("_of.write(")) == 10


def test_firmware_is_restarted_if_it_was_running(tmp_path, monkeypatch, capsys):
    state = {}

    def opener(port, timeout):
        state["dev"] = ExecDouble(tmp_path / "store", app=True)
        return state["dev"]

    monkeypatch.setattr(cli_serial, "open_device", opener)
    assert ovms_cli.main(["--port", "/dev/null", "config", "set", "vehicle", "id", "X"]) == 0
    assert state["dev"].closed == "reset"
    assert capsys.readouterr().out == "Parameter has been set.\n"  # the reset adds nothing


def test_boot_warnings_go_to_stderr_not_into_the_reply(tmp_path, monkeypatch, capsys):
    root = tmp_path / "store"
    root.mkdir()
    (root / "ovms.cfg").write_bytes(b"garbage")
    monkeypatch.setattr(cli_serial, "open_device", lambda p, t: ExecDouble(root, booted=False))
    assert ovms_cli.main(["--port", "/dev/null", "config", "set", "server.v3", "port", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == "Error: Invalid value 'x' for server.v3 port: expected an integer 0..65535\n"
    assert err.startswith("device: config: %s is corrupt (bad header), moved to " % (root / "ovms.cfg"))
    assert "device: config: booting on defaults" in err


def test_no_firmware_on_the_device_is_a_link_error(tmp_path, monkeypatch, capsys):
    class Bare(ExecDouble):
        def __init__(self, root):
            super().__init__(root, booted=False)
            self.exec("import sys\nfor k in list(sys.modules):\n    if k.startswith('ovms'):\n"
                      "        del sys.modules[k]\nsys.path[:] = []")

    monkeypatch.setattr(cli_serial, "open_device", lambda p, t: Bare(tmp_path / "store"))
    assert ovms_cli.main(["--port", "/dev/null", "shell", "help"]) == 2
    assert "no ovms.shell on the device" in capsys.readouterr().err


def test_missing_port_is_a_clear_error(capsys):
    assert ovms_cli.main(["--port", "/dev/nonexistent-tty", "shell", "help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open /dev/nonexistent-tty")
    assert os.path.exists(os.path.join(TOOLS, "cli_serial.py"))
