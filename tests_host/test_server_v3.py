"""OVMS v3 server (ovms.v3.server) on the micropython binary against a real mosquitto."""
import os
import time

from test_mqtt_kit import Proxy, broker, broker_dir, dev_factory, peers  # noqa: F401

PFX = "ovms/bob/CAR1/"
# The x64 unix port needs about twice the ESP32's heap for the same objects (8-byte
# pointers); the whole app (config, metrics, shell, server, TLS link) runs in 256K here.
HEAP = "256K"

SETUP = r'''
from ovms import config, metrics, shell
config.init(%(store)r)
config.update(%(cfg)r)
from ovms.v3 import server as server_v3
count = [0]
def _count(session, args):
    count[0] += 1
    return "count=%%d" %% count[0]
shell.register("testcount", "count calls", _count, secure=False)
srv = None
async def start():
    global srv
    srv = server_v3.start()
    srv_up = srv
    while srv.state != "connected":
        await asyncio.sleep_ms(50)
    ev("up")
def watch():
    async def w():
        st = None
        while True:
            s = server_v3.server()
            if s is not None and s.state != st:
                st = s.state
                ev("state", s=st)
            await asyncio.sleep_ms(20)
    asyncio.create_task(w())
watch()
'''


def config_items(port, ca=None, extra=()):
    items = [("server.v3", "server", "127.0.0.1"), ("server.v3", "port", port),
             ("server.v3", "user", "bob"), ("vehicle", "id", "CAR1")]
    if ca:
        items.append(("server.v3", "ca", ca))
    else:
        items.append(("server.v3", "tls", False))
    return items + list(extra)


def device(dev_factory, tmp_path, port, ca=None, extra=(), store="store"):
    st = tmp_path / store
    st.mkdir(exist_ok=True)
    return dev_factory(SETUP % {"store": str(st), "cfg": config_items(port, ca, extra)}, heap=HEAP)


def metric_topics(peer):
    return {m[0][len(PFX) + 7:].replace("/", "."): m[1].decode()
            for m in peer.all() if m[0].startswith(PFX + "metric/")}


def test_topics_values_retained_and_last_will_over_tls(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.tls_port, broker.ca)
    d.call("""
metrics.set("v.b.soc", 55.5)
metrics.set("v.e.locked", True)
metrics.set("v.d.fl", False)
metrics.set("v.b.c.voltage", [3.9, 3.91, 3.925])
metrics.set("v.p.odometer", 123456.7)
metrics.set("v.p.latitude", 52.123456)
metrics.set("v.c.state", "charging")
metrics.set("v.e.gear", -1)
metrics.set("v.c.timerstart", 3723)
await start()
""")
    peer = peers(broker.port, subs=(PFX + "#",))
    got = {}
    for _ in range(50):
        got = metric_topics(peer)
        if len(got) >= 10:
            break
        time.sleep(0.1)
    want = {"v.b.soc": "55.5", "v.e.locked": "yes", "v.d.fl": "no",
            "v.b.c.voltage": "3.9,3.91,3.925", "v.p.odometer": "123457",
            "v.p.latitude": "52.123456", "v.c.state": "charging", "v.e.gear": "-1",
            "v.c.timerstart": "01:02:03", "s.v3.connected": "yes"}
    for k, v in want.items():
        assert got.get(k) == v, (k, got.get(k))
    # every value is retained and equals metrics.text() on the device
    texts = d.call("return {n: metrics.text(n) for n in %r}" % list(want))
    assert texts == want
    assert all(m[2] for m in peer.all() if m[0].startswith(PFX + "metric/"))
    # only defined metrics under metric/, and the module's list of stale ones (none: ",")
    assert got.pop("s.v3.stale") == ","
    assert set(got) == set(want)
    # subscriptions are in place (module answers), then the device dies: last will
    d.kill()
    peer.wait_topic(PFX + "metric/s/v3/connected", b"no", timeout=10)


def test_custom_prefix_gets_trailing_slash(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port,
               extra=[("server.v3", "topic.prefix", "fleet/car7")])
    peer = peers(broker.port, subs=("fleet/#",))
    peer.settle()
    d.call('metrics.set("v.b.soc", 12)\nawait start()')
    peer.wait_topic("fleet/car7/metric/v/b/soc", b"12")


def test_delta_publishing_deadband_min_interval_priority_and_state(broker, dev_factory, peers,
                                                                  tmp_path):
    """The rules in real time over a real broker (test_server_v3_sched covers them in
    detail with a simulated clock)."""
    extra = [("server.v3", "updatetime.idle", 2), ("server.v3", "updatetime.on", 1),
             ("server.v3", "updatetime.awake", 2)]
    d = device(dev_factory, tmp_path, broker.port, extra=extra)
    peer = peers(broker.port, subs=(PFX + "metric/#",))
    peer.settle()
    d.call("""
metrics.configure("v.b.soc", deadband=1.0, min_interval=0)
metrics.configure("v.b.voltage", deadband=0, min_interval=3)
metrics.set("v.b.soc", 50.0)
metrics.set("v.b.voltage", 350.0)
metrics.set("v.e.locked", False)
metrics.set("v.e.on", False)
await start()
""")
    soc = PFX + "metric/v/b/soc"
    peer.wait_topic(soc, b"50")
    time.sleep(2.2)                      # let the idle interval (2 s) pass
    # below the deadband: nothing goes out
    d.call('metrics.set("v.b.soc", 50.6)')
    time.sleep(2.3)
    assert [m[1] for m in peer.got(soc)] == [b"50"]
    # the drift adds up: 51.2 is 1.2 from the published 50 -> published at once (quiet)
    t0 = time.monotonic()
    d.call('metrics.set("v.b.soc", 51.2)')
    m = peer.wait_topic(soc, b"51.2", timeout=5)
    assert m[4] - t0 < 1.0
    # a second change inside the interval waits for it (bound = 2 s)
    t0 = time.monotonic()
    d.call('metrics.set("v.b.soc", 53.0)')
    m = peer.wait_topic(soc, b"53", timeout=6)
    assert 0.7 < m[4] - t0 < 2.0 + 1.2, m[4] - t0
    # priority metric (v.e.locked is flagged priority): immediate despite the interval
    t0 = time.monotonic()
    d.call('metrics.set("v.e.locked", True)')
    m = peer.wait_topic(PFX + "metric/v/e/locked", b"yes", timeout=3)
    assert m[4] - t0 < 0.8
    # min_interval 3 s: a value changing every 0.25 s goes out at most every ~3 s, and
    # the last value is published within the bound
    n = d.start("""
for k in range(28):
    metrics.set("v.b.voltage", 351.0 + k)
    await asyncio.sleep_ms(250)
""")
    d.result(n, timeout=20)
    peer.wait_topic(PFX + "metric/v/b/voltage", b"378", timeout=5)
    ts = [m[4] for m in peer.got(PFX + "metric/v/b/voltage")]
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert len(ts) <= 5 and all(g > 2.0 for g in gaps[1:]), gaps
    # state: car on -> interval 1 s
    d.call('metrics.set("v.e.on", True)')
    time.sleep(1.2)
    t0 = time.monotonic()
    d.call('metrics.set("v.b.soc", 60.0)')
    d.call('metrics.set("v.b.soc", 62.0)')
    peer.wait_topic(soc, b"62", timeout=3)
    assert time.monotonic() - t0 < 1.8
    assert d.call("return srv.sched.interval()") == 1


def test_commands_run_once_with_qos2_and_reply_qos1(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    d.call("await start()")
    peer = peers(broker.port, subs=(PFX + "client/app1/response/#",))
    peer.settle()
    base = PFX + "client/app1/"
    peer.publish(base + "command/7", "testcount", qos=2)
    m = peer.wait_topic(base + "response/7")
    assert m[1] == b"count=1" and m[3] == 1 and m[2] is False
    peer.publish(base + "command/8", "testcount", qos=1)
    peer.wait_topic(base + "response/8", b"count=2")
    # an unknown command gets the shell's error text, bytes that are not UTF-8 an error
    peer.publish(base + "command/9", "nosuchcommand", qos=1)
    assert b"Unrecognised" in peer.wait_topic(base + "response/9")[1]
    peer.publish(base + "command/10", b"\xff\xfe", qos=1)
    assert peer.wait_topic(base + "response/10")[1].startswith(b"Error")
    # a retained command runs once when it is sent, but not again when the broker
    # replays it (retain flag set) after a reconnect
    peer.publish(base + "command/11", "testcount", qos=1, retain=True)
    peer.wait_topic(base + "response/11", b"count=3")
    d.call("server_v3.kick()")
    d.wait_event(lambda e: e["ev"] == "state" and e["s"] == "connected", start=len(d.events))
    time.sleep(1.0)
    peer.publish(base + "command/11", "", qos=1, retain=True)   # clear it
    time.sleep(0.3)
    assert d.call("return count[0]") == 3
    assert len(peer.got(base + "response/11")) == 1
    assert len(peer.got(base + "response/7")) == 1


def test_request_metric_republishes_and_marks_completion(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    d.call("""
metrics.set("v.b.soc", 80)
metrics.set("v.b.voltage", 390.5)
metrics.set("v.p.speed", 0)
await start()
""")
    peer = peers(broker.port, subs=(PFX + "metric/#", PFX + "client/app2/#"))
    peer.settle()
    time.sleep(0.5)
    peer.clear()
    peer.publish(PFX + "client/app2/request/metric", "v.b*", qos=1)
    done = peer.wait_topic(PFX + "client/app2/metric/done")
    got = metric_topics(peer)
    assert got == {"v.b.soc": "80", "v.b.voltage": "390.5"}
    assert done[1] == b"2" and done[3] == 1
    # completion comes after the values
    i_done = [m[0] for m in peer.all()].index(PFX + "client/app2/metric/done")
    assert i_done == len(peer.all()) - 1
    # values already sent for a request in the last minute are not sent again
    t0 = time.monotonic()
    peer.publish(PFX + "client/app2/request/metric", "*", qos=1)
    done = peer.wait(lambda m: m[0] == PFX + "client/app2/metric/done" and m[4] > t0)
    n = d.call("return sum(1 for i in range(metrics.count()) if metrics.defined(i))")
    assert int(done[1]) == n == len(metric_topics(peer))
    peer.clear()
    peer.publish(PFX + "client/app2/request/metric", "v.p.speed,nosuch.metric", qos=1)
    assert peer.wait_topic(PFX + "client/app2/metric/done")[1] == b"1"


def test_peers_tracked_and_expire(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port,
               extra=[("server.v3", "updatetime.connected", 1)])
    d.call("await start()")
    peer = peers(broker.port, subs=(PFX + "metric/s/v3/peers",))
    peer.settle()
    peer.publish(PFX + "client/app1/active", "1", qos=1)
    peer.publish(PFX + "client/app9/active", "1", qos=1)
    peer.wait_topic(PFX + "metric/s/v3/peers", b"2", timeout=5)
    assert d.call("return srv.sched.interval()") == 1
    peer.publish(PFX + "client/app1/active", "0", qos=1)
    peer.publish(PFX + "client/app9/active", "", qos=1)
    peer.wait_topic(PFX + "metric/s/v3/peers", b"0", timeout=5)
    # expiry (120 s) with a shifted clock: uptime() jumps forward
    peer.publish(PFX + "client/app3/active", "1", qos=1)
    time.sleep(0.5)
    assert d.call("return len(srv.peers)") == 1
    d.call("srv._expire(metrics.uptime() + 121)")
    assert d.call("return len(srv.peers)") == 0


def test_home_assistant_integration_status_counts_as_a_viewer(broker, dev_factory, peers, tmp_path):
    """The OVMS integration for Home Assistant never publishes client/<cid>/active; its
    retained <prefix>status online/offline (offline is its will) makes it a viewer, with no
    120-s expiry."""
    d = device(dev_factory, tmp_path, broker.port,
               extra=[("server.v3", "updatetime.connected", 1)])
    peer = peers(broker.port, subs=(PFX + "metric/s/v3/peers",))
    peer.settle()
    peer.publish(PFX + "status", "online", qos=1, retain=True)     # before the module connects
    time.sleep(0.3)
    d.call("await start()")
    peer.wait_topic(PFX + "metric/s/v3/peers", b"1", timeout=5)
    assert d.call("return srv.sched.interval()") == 1
    d.call("srv._expire(metrics.uptime() + 3600)")
    assert d.call("return len(srv.peers)") == 1
    peer.publish(PFX + "status", "offline", qos=1, retain=True)
    peer.wait_topic(PFX + "metric/s/v3/peers", b"0", timeout=5)
    peer.publish(PFX + "status", "", qos=1, retain=True)


def test_notifications_survive_broker_restart_and_full_republish(broker, dev_factory, peers,
                                                                 tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    d.call('metrics.set("v.b.soc", 70)\nmetrics.set("v.b.range.est", 250)\nawait start()')
    broker.stop()
    d.wait_event(lambda e: e["ev"] == "state" and e["s"].startswith("reconnecting"), timeout=5)
    d.call("""
for k in range(5):
    server_v3.notify("alert", "batt.soc.alert", "SOC low %d" % k)
""")
    broker.start()       # no persistence: every retained value is gone
    peer = peers(broker.port, subs=(PFX + "#",))
    peer.settle()
    for k in range(5):
        peer.wait_topic(PFX + "notify/alert/batt/soc/alert", b"SOC low %d" % k, timeout=20)
    notes = [m for m in peer.all() if m[0].startswith(PFX + "notify/")]
    assert [m[1] for m in notes] == [b"SOC low %d" % k for k in range(5)]
    assert all(m[3] == 1 for m in notes)
    got = metric_topics(peer)
    assert got.get("v.b.soc") == "70" and got.get("v.b.range.est") == "250"
    assert got.get("s.v3.connected") == "yes"
    # acknowledged -> removed from flash
    assert d.call("for _ in range(100):\n    if not len(srv.ob): break\n"
                  "    await asyncio.sleep_ms(20)\nreturn len(srv.ob)") == 0


def test_blackholed_link_detected_then_recovered_without_losing_notifications(
        broker, dev_factory, peers, tmp_path):
    px = Proxy(broker.port)
    try:
        d = device(dev_factory, tmp_path, px.port)
        d.call('metrics.set("v.b.soc", 40)\nawait start()')
        # a short keepalive (config allows >= 10 s) keeps the test short; the client
        # reconnects with it at once
        n0 = len(d.events)
        d.call("srv.client.keepalive = 2\nsrv.client.kick()")
        k, _ = d.wait_event(lambda e: e["ev"] == "state" and e["s"] == "connected", start=n0)
        peer = peers(broker.port, subs=(PFX + "#",))
        peer.settle()
        t0 = time.monotonic()
        px.blackhole(True)
        d.call('server_v3.notify("info", "x.during", "sent during the blackout")')
        _, e = d.wait_event(lambda e: e["ev"] == "state" and e["s"].startswith("reconnecting"),
                            timeout=20, start=k)
        assert e["host_t"] - t0 <= 3.4           # 1.5 x keepalive
        assert "nothing received" in e["s"]
        d.call('metrics.set("v.b.soc", 41)')
        peer.clear()
        px.blackhole(False)
        peer.wait_topic(PFX + "notify/info/x/during", b"sent during the blackout", timeout=20)
        peer.wait_topic(PFX + "metric/v/b/soc", b"41", timeout=10)
        peer.wait_topic(PFX + "metric/s/v3/connected", b"yes", timeout=10)
    finally:
        px.close()


def test_notifications_survive_reboot(broker, dev_factory, peers, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    d = device(dev_factory, tmp_path, dead)
    d.start("await start()")
    d.call("""
for k in range(3):
    server_v3.notify("info", "trip.report", "trip %d" % k)
""")
    d.kill()                               # power cut before any link
    peer = peers(broker.port, subs=(PFX + "notify/#",))
    peer.settle()
    d2 = device(dev_factory, tmp_path, broker.port)   # same flash store, broker reachable
    d2.call("await start()")
    for k in range(3):
        peer.wait_topic(PFX + "notify/info/trip/report", b"trip %d" % k, timeout=10)
    assert [m[1] for m in peer.got(PFX + "notify/info/trip/report")] == [
        b"trip %d" % k for k in range(3)]


def test_stale_list_set_and_cleared(broker, dev_factory, peers, tmp_path):
    """One retained metric/s/v3/stale lists the stale metrics (",a.b,c.d,"; "," when none):
    nothing that an OVMS client would take for a new vehicle metric; markers of the earlier
    per-metric scheme (stale/<path>) are deleted at the first connect."""
    d = device(dev_factory, tmp_path, broker.port)
    peer = peers(broker.port, subs=(PFX + "stale/#", PFX + "metric/#"))
    peer.settle()
    old = PFX + "stale/xtest/old"
    peer.publish(old, "yes", qos=1, retain=True)           # left by an earlier version
    time.sleep(0.3)
    d.call("""
metrics.define("xtest.fast", "f", "V", stale=3)
metrics.set("xtest.fast", 1.5)
await start()
""")
    st = PFX + "metric/s/v3/stale"
    peer.wait_topic(PFX + "metric/xtest/fast", b"1.5")
    peer.wait_topic(old, b"", timeout=10)               # the old marker deleted
    m = peer.wait(lambda m: m[0] == st and b",xtest.fast," in m[1], timeout=10)[1]   # not updated for > 3 s
    assert m.startswith(b",") and m.endswith(b",")
    d.call('metrics.set("xtest.fast", 1.6)')
    peer.clear()
    peer.wait(lambda m: m[0] == st and b",xtest.fast," not in m[1], timeout=10)   # fresh again
    d.call('metrics.set("xtest.fast", 1.6)\nawait asyncio.sleep_ms(4500)')
    # a late subscriber sees the value AND the list (both retained)
    time.sleep(1.0)
    p2 = peers(broker.port, subs=(st,))
    p2.wait(lambda m: m[0] == st and b",xtest.fast," in m[1])
    assert not [m for m in peer.all() if m[0].startswith(PFX + "stale/") and m[0] != old]
    # reboot: the list is published anew at connect (the metric fresh: not in it)
    d.kill()
    d2 = device(dev_factory, tmp_path, broker.port)
    peer.clear()
    d2.call("""
metrics.define("xtest.fast", "f", "V", stale=60)
metrics.set("xtest.fast", 2.0)
await start()
""")
    peer.wait(lambda m: m[0] == st and b",xtest.fast," not in m[1], timeout=10)


def test_secrets_never_printed_and_replies_are_no_oracle(tmp_path, dev_factory, peers):
    """Secrets are masked where config prints them; replies are not searched for them, so
    `config get password "<guess>"` answers alike for a right and a wrong guess."""
    from broker import Broker
    b = Broker(os.path.join(broker_dir(), "b"), users={"bob": "mqtt-Pass-77", "spy": "spy"}).start()
    try:
        secrets = ["mqtt-Pass-77", "module-PW-1234", "wifi-Secret-99"]
        extra = [("password", "server.v3", secrets[0]), ("password", "module", secrets[1]),
                 ("wifi.ssid", "HomeNet", secrets[2])]
        d = device(dev_factory, tmp_path, b.port, extra=extra)
        d.call("await start()")
        peer = peers(b.port, subs=("#",), user="spy", password="spy")
        peer.settle()
        base = PFX + "client/app1/"
        cmds = ["config list password", "config list wifi.ssid", "config list server.v3",
                "config get password module", "config get wifi.ssid HomeNet"]
        for k, cmd in enumerate(cmds):
            peer.publish(base + "command/%d" % k, cmd, qos=1)
            peer.wait_topic(base + "response/%d" % k, timeout=10)
        blob = b"\n".join(m[0].encode() + b" " + m[1] for m in peer.all()
                          if "/command/" not in m[0])
        for s in secrets:
            assert s.encode() not in blob, s
        assert b"********" in blob
        # the oracle: a right and a wrong guess get the same reply (the guess echoed as given)
        replies = []
        for k, guess in enumerate([secrets[1], "module-PW-1235"]):
            peer.publish(base + "command/g%d" % k, 'config get password "%s"' % guess, qos=1)
            replies.append(peer.wait_topic(base + "response/g%d" % k, timeout=10)[1].decode())
        assert replies[0].replace(secrets[1], "GUESS") == replies[1].replace("module-PW-1235", "GUESS")
        assert "GUESS" in replies[0].replace(secrets[1], "GUESS")
    finally:
        b.stop()


def test_events_published_while_connected(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    d.call("await start()")
    peer = peers(broker.port, subs=(PFX + "event", PFX + "event/#"))
    peer.settle()
    r = d.call('return [server_v3.event(n) for n in ("vehicle.locked", "ticker.60", "clock.0800")]')
    assert r == [True, False, False]
    peer.wait_topic(PFX + "event/vehicle/locked", b"")
    peer.wait_topic(PFX + "event", b"vehicle.locked")          # legacy topic (default yes)
    d.call('config.set("server.v3", "events.legacy_topic", False)\n'
           'server_v3.event("vehicle.unlocked")')
    peer.wait_topic(PFX + "event/vehicle/unlocked", b"")
    time.sleep(0.3)
    assert [m[1] for m in peer.got(PFX + "event")] == [b"vehicle.locked"]
    assert not [m for m in peer.all() if "ticker" in m[0] or "clock" in m[0]]


def test_auth_failure_then_config_change_reconnects_at_once(dev_factory, peers, tmp_path):
    from broker import Broker
    b = Broker(os.path.join(broker_dir(), "b"), users={"bob": "right-pw", "spy": "spy"}).start()
    try:
        d = device(dev_factory, tmp_path, b.port, extra=[("password", "server.v3", "wrong-pw")])
        d.start("await start()")
        for _ in range(100):
            if d.call("return srv is not None and srv.client is not None and "
                      "srv.client.auth_failed"):
                break
            time.sleep(0.1)
        st = d.call("return server_v3.status()")
        assert "not authorized" in st, st
        # retries are slowed down (auth errors back off to the cap) ...
        assert d.call("return srv.client.backoff_ms() >= 150000")
        peer = peers(b.port, subs=(PFX + "#", "fleet/#"), user="spy", password="spy")
        peer.settle()
        # ... but fixing the password reconnects at once
        t0 = time.monotonic()
        d.call('config.set("password", "server.v3", "right-pw")')
        peer.wait_topic(PFX + "metric/s/v3/connected", b"yes", timeout=10)
        assert time.monotonic() - t0 < 5
        # a new prefix: reconnect, everything under the new prefix, will moved along
        d.call('metrics.set("v.b.soc", 33)\nconfig.set("server.v3", "topic.prefix", "fleet/c1/")')
        peer.wait_topic("fleet/c1/metric/v/b/soc", b"33", timeout=10)
        peer.wait_topic(PFX + "metric/s/v3/connected", b"no", timeout=10)
        d.kill()
        peer.wait_topic("fleet/c1/metric/s/v3/connected", b"no", timeout=10)
    finally:
        b.stop()


def test_stop_says_goodbye_even_without_the_event_loop(broker, dev_factory, peers, tmp_path):
    """app.stop() calls server_v3.stop() from a new event loop: the goodbye (connected=no
    and a clean DISCONNECT, so the broker drops the will) must not need the old loop."""
    d = device(dev_factory, tmp_path, broker.port)
    d.call("await start()")
    assert d.call("return server_v3.server().connected") is True
    peer = peers(broker.port, subs=(PFX + "metric/s/v3/connected",))
    peer.wait_topic(PFX + "metric/s/v3/connected", b"yes")
    d.call("server_v3.server().goodbye()")          # synchronous: no await at all
    peer.wait_topic(PFX + "metric/s/v3/connected", b"no", timeout=5)
    assert d.call("return server_v3.server().connected") is False
    # the module API: stop() ends the task; start() afterwards brings it back
    assert d.call("await server_v3.stop()\nreturn server_v3.server()") is None
    peer.clear()
    d.call("await start()")
    peer.wait_topic(PFX + "metric/s/v3/connected", b"yes", timeout=10)
    d.call("await server_v3.stop()")
    peer.wait_topic(PFX + "metric/s/v3/connected", b"no", timeout=5)
    time.sleep(0.3)
    broker.stop()                      # flushes mosquitto's log
    log = open(broker.log.name, errors="replace").read()
    # both times a clean DISCONNECT (not a dropped connection that fires the will)
    assert log.count("Client CAR1 disconnected") == 2, log[-2000:]
    assert "Client CAR1 closed its connection" not in log


def test_alive_for_the_watchdog(broker, dev_factory, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    assert d.call("return server_v3.alive()") is False          # not started
    d.call("await start()")
    assert d.call("return server_v3.alive()") is True
    # a stuck publisher loop (simulated: its heartbeat stops) is reported
    assert d.call("srv._tasks[1].cancel()\nawait asyncio.sleep_ms(300)\n"
                  "return server_v3.alive(200)") is False
    d.call("await server_v3.stop()")
    assert d.call("return server_v3.alive()") is False


def test_tls_without_ca_file_is_an_error_then_fixed_by_config(broker, dev_factory, peers,
                                                              tmp_path):
    """TLS is the default (no tls setting); a missing CA file is reported, not a crash;
    pointing server.v3 ca at the file connects."""
    st = tmp_path / "store"
    st.mkdir()
    items = [("server.v3", "server", "127.0.0.1"), ("server.v3", "port", broker.tls_port),
             ("server.v3", "user", "bob"), ("vehicle", "id", "CAR1"),
             ("server.v3", "ca", str(tmp_path / "missing.pem"))]
    d = dev_factory(SETUP % {"store": str(st), "cfg": items}, heap=HEAP)
    d.start("await start()")
    d.wait_event(lambda e: e["ev"] == "state" and e["s"].startswith("error"))
    assert "cannot read CA file" in d.call("return server_v3.status()")
    peer = peers(broker.port, subs=(PFX + "metric/s/v3/connected",))
    peer.settle()
    d.call('config.set("server.v3", "ca", %r)' % broker.ca)
    peer.wait_topic(PFX + "metric/s/v3/connected", b"yes", timeout=10)
    assert "mqtts://" in d.call("return server_v3.status()")


def test_periodic_full_resend_only_when_configured(broker, dev_factory, peers, tmp_path):
    d = device(dev_factory, tmp_path, broker.port)
    peer = peers(broker.port, subs=(PFX + "metric/v/b/soc",))
    peer.settle()
    d.call('metrics.set("v.b.soc", 71)\nawait start()')
    peer.wait_topic(PFX + "metric/v/b/soc", b"71")
    time.sleep(2.5)
    assert len(peer.got(PFX + "metric/v/b/soc")) == 1      # schema default: no resend
    d.call('config.set("server.v3", "updatetime.sendall", 1)')
    time.sleep(3.2)
    n = len(peer.got(PFX + "metric/v/b/soc"))
    assert 3 <= n <= 6, n                                    # ~ every second when set


def test_a_notification_the_broker_refuses_is_set_aside_not_resent_forever(dev_factory, peers,
                                                                           tmp_path):
    """mosquitto max_packet_size 512: a 600-byte notification makes the broker drop the
    link. After a few such drops it is set aside (kept in a file, counted in the status) and
    the notifications behind it get through; the link stays up."""
    from broker import Broker

    class Small(Broker):
        def _conf(self):
            path = super()._conf()
            with open(path) as f:
                text = f.read().replace("max_packet_size 1048576", "max_packet_size 512")
            with open(path, "w") as f:
                f.write(text)
            return path
    b = Small(os.path.join(broker_dir(), "b")).start()
    try:
        d = device(dev_factory, tmp_path, b.port)
        d.call("await start()")
        peer = peers(b.port, subs=(PFX + "notify/#",))
        peer.settle()
        d.call('server_v3.notify("info", "big", "x" * 600)\n'
               'server_v3.notify("info", "small", "after the big one")')
        peer.wait_topic(PFX + "notify/info/small", b"after the big one", timeout=40)
        time.sleep(0.5)
        st = d.call("return srv.client.connects, server_v3.status(), len(srv.ob), "
                    "srv.held().peek()")
        connects, status, waiting, held = st
        assert connects <= 4, status         # 3 drops, then it was set aside
        assert waiting == 0
        assert "Set aside: 1 notification(s) the link could not carry" in status
        assert held[1] == "notify/info/big" and held[2] == b"x" * 600
        assert not peer.got(PFX + "notify/info/big")
        n = connects
        time.sleep(2)
        assert d.call("return srv.client.connects, srv.client.isconnected()") == (n, True)
    finally:
        b.stop()


def test_repeated_full_requests_are_answered_but_not_republished(broker, dev_factory, peers,
                                                                   tmp_path):
    """Any client can ask for everything: request/metric and `server v3 update all`. Within
    a minute an unchanged metric goes out once for requests of more than 8 metrics (every
    request still gets its done marker with the full count) and full republishes are
    coalesced into one."""
    d = device(dev_factory, tmp_path, broker.port)
    d.call("k = 0\nfor i in range(metrics.count()):\n"
           "    if metrics.typecode(i) == 'f' and k < 16 and not metrics.defined(i):\n"
           "        metrics.set(i, 1.5 + k)\n        k += 1\nawait start()")
    peer = peers(broker.port, subs=(PFX + "metric/#", PFX + "client/+/metric/done"))
    peer.settle()
    time.sleep(0.5)
    peer.clear()
    n = d.call("return sum(1 for i in range(metrics.count()) if metrics.defined(i))")
    assert n > 8            # a request for up to 8 metrics is always served in full
    for k in range(12):
        peer.publish(PFX + "client/x%d/request/metric" % k, "*", qos=1)
        peer.wait_topic(PFX + "client/x%d/metric/done" % k)
    dones = [m for m in peer.all() if m[0].endswith("/metric/done")]
    assert [m[1] for m in dones] == [str(n).encode()] * 12
    values = [m for m in peer.all() if m[0].startswith(PFX + "metric/")]
    assert len(values) <= n + 2, len(values)         # once (+ a change or two), not 12 times
    assert "%d values not resent" % (11 * n) in d.call("return server_v3.status()")
    # update all: right after the connect's full republish it waits; five requests, one run
    p0 = d.call("return srv.published")
    replies = [d.call('return srv.update("all")') for _ in range(5)]
    assert all(r.startswith("Update (all) scheduled in ") for r in replies), replies
    time.sleep(1)
    assert d.call("return srv.published") - p0 <= 2
    d.call("srv._full_t -= 60")                   # a minute later
    time.sleep(1.5)
    d.call('srv.update("all")')
    time.sleep(1.5)
    grown = d.call("return srv.published") - p0
    assert n - 1 <= grown <= n + 2, (grown, n)    # one full republish (s.v3.connected apart)


def _until(pred, timeout=10):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not met in %s s" % timeout
        time.sleep(0.1)


def _catch_connect(srv, got):
    """Accept one connection on srv and keep what the client sends in its first second."""
    import socket
    srv.settimeout(20)
    try:
        c, _ = srv.accept()
    except socket.timeout:
        return
    c.settimeout(1.0)
    buf = b""
    try:
        while len(buf) < 4096:
            b = c.recv(1024)
            if not b:
                break
            buf += b
    except OSError:
        pass
    got.append(buf)
    c.close()


def test_link_change_over_mqtt_never_carries_the_stored_password(tmp_path, dev_factory, peers):
    """A remote `config set server.v3 tls no` or a new port/server clears the stored MQTT
    password before the module connects anywhere: the host the sender names never sees it."""
    import socket
    import threading
    from broker import Broker
    b = Broker(os.path.join(broker_dir(), "b"), users={"bob": "mqtt-Pass-77", "spy": "spy"}).start()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        d = device(dev_factory, tmp_path, b.tls_port, b.ca,
                   extra=[("password", "server.v3", "mqtt-Pass-77"), ("password", "module", "pw-1")])
        d.call("await start()")
        peer = peers(b.port, subs=(PFX + "client/spy/response/#",), user="spy", password="spy")
        peer.settle()
        base = PFX + "client/spy/"

        def cmd(k, line):
            peer.publish(base + "command/%s" % k, line, qos=1)
            return peer.wait_topic(base + "response/%s" % k, timeout=10)[1].decode()
        # (commands over the broker link are trusted: no enable)
        # a change that keeps the link (same server) keeps the password
        assert cmd(0, "config set server.v3 server 127.0.0.1") == "Parameter has been set."
        assert d.call('return config.get("password", "server.v3")') == "mqtt-Pass-77"
        # an invalid value changes nothing
        assert cmd(1, "config set server.v3 port 99999").startswith("Error: Invalid value")
        assert d.call('return config.get("password", "server.v3")') == "mqtt-Pass-77"
        # a downgrade to plain MQTT clears it
        # (its reply may be lost: the link restarts at once)
        peer.publish(base + "command/2", "config set server.v3 tls no", qos=1)
        _until(lambda: d.call('return config.get("server.v3", "tls")') is False)
        assert not d.call('return config.get("password", "server.v3")')
        # the module now logs in without a password (the broker refuses it): set it anew
        # locally, then a move to another host clears it again before connecting there
        d.call('config.set("server.v3", "tls", True)\n'
               'config.set("password", "server.v3", "mqtt-Pass-77")')
        time.sleep(1.0)
        got = []
        t = threading.Thread(target=_catch_connect, args=(srv, got))
        t.start()
        try:
            peer.publish(base + "command/3", "config set server.v3 port %d" % srv.getsockname()[1],
                         qos=1)
            peer.publish(base + "command/4", "config set server.v3 tls no", qos=1)
        finally:
            t.join(30)
        assert got, "the module did not connect to the new host"
        assert b"mqtt-Pass-77" not in got[0]
        assert not d.call('return config.get("password", "server.v3")')
    finally:
        srv.close()
        b.stop()
