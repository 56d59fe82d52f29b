"""`make sim` is a real OVMS setup: its broker takes only the generated account (no anonymous
clients), the password is kept in .sim/ (0600) across runs, and the topic prefix follows from
the account (ovms/<user>/<vehicleid>/)."""
import os
import shutil
import stat
import threading

import paho.mqtt.client as mqtt

import cli_link
import sim
from test_mqtt_kit import broker_dir


def _connect(port, user=None, password=None, ca=None):
    """The broker's CONNACK reason for a client (None: no answer)."""
    done = threading.Event()
    got = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-%d" % id(done))
    if user:
        c.username_pw_set(user, password)
    if ca:
        c.tls_set(ca_certs=ca)

    def on_connect(cl, u, f, rc, p=None):
        got.append(rc)
        done.set()
    c.on_connect = on_connect
    c.connect("localhost" if ca else "127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def test_sim_broker_requires_the_generated_account():
    d = broker_dir()
    try:
        b, pw, pw_file = sim.start_broker(d)
        try:
            assert stat.S_IMODE(os.stat(pw_file).st_mode) == 0o600
            assert open(pw_file).read().strip() == pw and len(pw) >= 12
            with open(os.path.join(d, "broker", "passwd")) as f:
                assert pw not in f.read()          # hashed (mosquitto_passwd), never in clear
            assert _connect(b.port).is_failure                      # anonymous: refused
            assert _connect(b.port, sim.USER, "wrong").is_failure
            assert not _connect(b.port, sim.USER, pw).is_failure
            assert not _connect(b.tls_port, sim.USER, pw, b.ca).is_failure
        finally:
            b.stop()
        # the next run keeps the password (the provisioned module still logs in)
        b2, pw2, _ = sim.start_broker(d)
        b2.stop()
        assert pw2 == pw
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_sim_prefix_is_ovms_user_vehicleid():
    assert cli_link.topic_prefix(sim.USER, "SIM1") == "ovms/sim/SIM1/"


def test_readme_shows_the_lines_make_sim_prints(monkeypatch):
    from util import REPO
    monkeypatch.chdir(REPO)
    st = os.path.join(REPO, ".sim")
    text = sim.usage(st, 1883, 8883, os.path.join(".sim", "broker", "ca.pem"), "PW",
                     os.path.join(st, "mqtt-password"), "SIM1", os.path.join(st, "ota.key"),
                     os.path.join(st, "pty"))
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    shown = [ln for ln in text.splitlines() if ln.split(":")[0] in
             ("watch", "shell", "metrics", "ota", "attach", "can")]
    assert len(shown) == 6
    for ln in shown:
        ln = ln.split("     (")[0]             # the attach line's remark is not in the README
        assert "    " + ln + "\n" in readme, ln
    assert "--user sim --password \"$(cat .sim/mqtt-password)\" --id SIM1" in text
