"""tools/ovms.py ... shell "CMD" over a real mosquitto, answered by a small fake module (paho)."""
import os
import shutil
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

import ovms as ovms_cli
from test_mqtt_kit import broker, broker_dir  # noqa: F401  (broker: in a dir mosquitto can read)
from util import REPO


class Responder:
    """Answers <prefix>client/<cid>/command/<id> on .../response/<id> like a module would."""

    def __init__(self, broker, prefix, user=None, password=None):
        self.seen = []          # (topic, payload str, qos)
        self.prefix = prefix
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-module")
        if user:
            self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(prefix + "client/+/command/+", qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert self.ready.wait(10), "responder did not subscribe"

    def _msg(self, c, u, msg):
        line = msg.payload.decode()
        self.seen.append((msg.topic, line, msg.qos))
        parts = msg.topic[len(self.prefix):].split("/")
        assert parts[0] == "client" and parts[2] == "command", msg.topic
        if line == "silent":
            return
        if line == "fail":
            reply = "Error: Secure command requires 'enable' mode"
        elif line == "nonsense":
            reply = "Unrecognised command"
        elif line == "usage":
            reply = "Usage: metrics get <metric>"
        elif line == "metrics list v.p":
            reply = ("v.p.odometer                             [     2s ] 25088.06km\n"
                     "v.p.speed                                [    40sS] 0km/h")
        else:
            reply = "reply to [%s]\nline 2 \u00b0C" % line
        c.publish("%sclient/%s/response/%s" % (self.prefix, parts[1], parts[3]), reply, qos=1)

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def responder(broker):
    r = Responder(broker, "ovms//CAR1/")
    yield r
    r.stop()


def cli(capsys, *argv):
    rc = ovms_cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tls_command_roundtrip(broker, responder, capsys):
    rc, out, err = cli(capsys, "--mqtt", "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca,
                       "--id", "CAR1", "shell", "metrics list v.b")
    assert rc == 0, err
    assert out == "reply to [metrics list v.b]\nline 2 \u00b0C\n"
    topic, line, qos = responder.seen[-1]
    parts = topic.split("/")
    assert parts[:4] == ["ovms", "", "CAR1", "client"] and parts[5] == "command"
    assert qos == 1 and line == "metrics list v.b"
    # a second invocation uses a fresh client id and a fresh command id
    rc, out, err = cli(capsys, "--mqtt", "mqtts://127.0.0.1:%d" % broker.tls_port, "--ca", broker.ca,
                       "--id", "CAR1", "shell", "stat")
    assert rc == 0 and out.startswith("reply to [stat]")
    p2 = responder.seen[-1][0].split("/")
    assert p2[4] != parts[4] and p2[6] != parts[6]


def test_plain_tcp_and_error_replies_exit_1(broker, responder, capsys):
    base = ("--mqtt", "mqtt://127.0.0.1:%d" % broker.port, "--id", "CAR1", "shell")
    assert cli(capsys, *base, "module info")[0] == 0
    for line, text in (("fail", "Error: Secure"), ("nonsense", "Unrecognised command"),
                       ("usage", "Usage: metrics get")):
        rc, out, err = cli(capsys, *base, line)
        assert rc == 1 and out.startswith(text)


def test_timeout_without_reply(broker, responder, capsys):
    t = time.monotonic()
    rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % broker.port, "--id", "CAR1",
                       "--timeout", "1", "shell", "silent")
    assert rc == 1 and out == ""
    assert "no response" in err
    assert time.monotonic() - t < 5
    assert responder.seen[-1][1] == "silent"


def test_no_module_listening_times_out(broker, capsys):
    rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % broker.port, "--id", "NOBODY",
                       "--timeout", "0.5", "shell", "stat")
    assert rc == 1 and "no response" in err


def test_connection_errors(broker, tmp_path, capsys):  # noqa: F811
    from broker import free_port, make_ca
    rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % free_port(), "--id", "X",
                       "--timeout", "2", "shell", "stat")
    assert rc == 1 and "cannot connect" in err
    other = make_ca(str(tmp_path / "other"))["ca.pem"]      # a CA that did not sign the broker
    rc, out, err = cli(capsys, "--mqtt", "mqtts://localhost:%d" % broker.tls_port, "--ca", other,
                       "--id", "X", "--timeout", "2", "shell", "stat")
    assert rc == 1 and "error:" in err
    rc, out, err = cli(capsys, "--mqtt", "http://127.0.0.1:1", "--id", "X", "shell", "stat")
    assert rc == 1 and "bad --mqtt URL" in err
    rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % broker.port, "shell", "stat")
    assert rc == 2 and "--id" in err


def test_user_password_and_prefix(tmp_path, capsys):
    from broker import Broker
    bdir = broker_dir()
    b = Broker(os.path.join(bdir, "b"), users={"alice": "pw1", "module": "pw2"}).start()
    try:
        r = Responder(b, "ovms/alice/CAR9/", "module", "pw2")
        try:
            rc, out, err = cli(capsys, "--mqtt", "mqtts://localhost:%d" % b.tls_port, "--ca", b.ca,
                               "--user", "alice", "--password", "pw1", "--id", "CAR9", "shell", "stat")
            assert rc == 0, err
            assert r.seen[-1][0].startswith("ovms/alice/CAR9/client/ovmscli-")
            rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % b.port, "--user", "alice",
                               "--password", "wrong", "--id", "CAR9", "shell", "stat")
            assert rc == 1 and "refused" in err
            # explicit prefix (trailing / added), and the config subcommand with quoting
            r2 = Responder(b, "my/car/", "module", "pw2")
            try:
                rc, out, err = cli(capsys, "--mqtt", "mqtt://127.0.0.1:%d" % b.port, "--user", "alice",
                                   "--password", "pw1", "--prefix", "my/car", "config", "set", "vehicle",
                                   "name", 'My "Car"')
                assert rc == 0, err
                assert r2.seen[-1][1] == 'config set vehicle name "My \\"Car\\""'
            finally:
                r2.stop()
        finally:
            r.stop()
    finally:
        b.stop()
        shutil.rmtree(bdir, ignore_errors=True)


def test_interactive_shell_with_history(broker, responder, tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ovms.py"), "--mqtt",
                        "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--id", "CAR1",
                        "shell"], input="metrics list\n\nfail\nstat\nexit\nnever sent\n",
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert "reply to [metrics list]" in p.stdout and "reply to [stat]" in p.stdout
    assert "Error: Secure" in p.stdout
    assert [s[1] for s in responder.seen] == ["metrics list", "fail", "stat"]
    cids = set(s[0].split("/")[4] for s in responder.seen)
    assert len(cids) == 1   # one connection for the whole session


def test_exact_command_form_as_subprocess(broker, responder):
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ovms.py"), "--mqtt",
                        "mqtts://localhost:%d" % broker.tls_port, "--ca", broker.ca, "--id", "CAR1",
                        "shell", "metrics list v.b"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("reply to [metrics list v.b]")


def test_json_output_and_metrics_subcommand(broker, responder, capsys):
    import json
    base = ("--mqtt", "mqtt://127.0.0.1:%d" % broker.port, "--id", "CAR1")
    rc, out, err = cli(capsys, *base, "metrics", "list", "v.p", "--json")
    assert rc == 0, err
    assert responder.seen[-1][1] == "metrics list v.p"
    assert json.loads(out) == {
        "command": "metrics list v.p", "ok": True, "truncated": False,
        "reply": responder_reply_vp(), "data": [
            {"name": "v.p.odometer", "age": 2, "stale": False, "value": "25088.06km"},
            {"name": "v.p.speed", "age": 40, "stale": True, "value": "0km/h"}]}
    rc, out, err = cli(capsys, "--json", *base, "shell", "fail")
    assert rc == 1 and json.loads(out)["ok"] is False
    rc, out, err = cli(capsys, *base, "--json", "shell")
    assert rc == 2 and "--json needs a command" in err


def responder_reply_vp():
    return ("v.p.odometer                             [     2s ] 25088.06km\n"
            "v.p.speed                                [    40sS] 0km/h")
