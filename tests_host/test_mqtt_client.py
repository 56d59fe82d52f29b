"""MQTT client (ovms.mqtt) on the micropython binary against a real mosquitto."""
import os
import time

from test_mqtt_kit import (FakeBroker, Proxy, broker, broker_dir, dev_factory,  # noqa: F401
                           peers, publish_pkt, read_packet)

SETUP = r'''
from ovms.mqtt import MQTTClient, MQTTException, ssl_context
c = None
def cb(t, m, r, q, d):
    ev("msg", topic=t.decode(), msg=m.decode(), retain=r, qos=q, dup=d)
def new(port, tls=None, host="localhost", **kw):
    global c
    ctx = ssl_context(tls) if tls else None
    c = MQTTClient(kw.pop("cid", "dev1"), "127.0.0.1", port, ssl=ctx, server_hostname=host, **kw)
    c.set_callback(cb)
    c.on_down = lambda why: ev("down", why=why)
    async def up(sp):
        ev("up", sp=sp)
    c.on_up = up
    return c
'''


def test_tls_connect_and_qos_0_1_2_both_directions(broker, dev_factory, peers):
    peer = peers(broker.port, subs=("dev/out/#",))
    peer.settle()
    d = dev_factory(SETUP)
    d.call("""
new(%d, %r, keepalive=30)
sp = await c.connect()
for q in (0, 1, 2):
    assert await c.subscribe("dev/in/%%d" %% q, q) == q
return sp
""" % (broker.tls_port, broker.ca))
    for q in (0, 1, 2):
        peer.publish("dev/in/%d" % q, "to-dev-%d" % q, qos=q)
    for q in (0, 1, 2):
        d.wait_event(lambda e, q=q: e["ev"] == "msg" and e["topic"] == "dev/in/%d" % q)
    time.sleep(0.5)
    got = d.evs("msg")
    assert sorted((e["topic"], e["msg"], e["qos"]) for e in got) == [
        ("dev/in/%d" % q, "to-dev-%d" % q, q) for q in (0, 1, 2)]   # each exactly once
    d.call("""
for q in (0, 1, 2):
    await c.publish("dev/out/%d" % q, "from-dev-%d" % q, qos=q)
await c.publish("dev/out/r", "kept", retain=True, qos=1)
""")
    for q in (0, 1, 2):
        m = peer.wait_topic("dev/out/%d" % q)
        assert m[1] == b"from-dev-%d" % q and m[3] == q
    time.sleep(0.3)
    assert len(peer.got("dev/out/2")) == 1
    # retained: a new subscriber gets it
    p2 = peers(broker.port, subs=("dev/out/r",))
    m = p2.wait_topic("dev/out/r")
    assert m[1] == b"kept" and m[2] is True
    st = d.call("return (c.tx_bytes, c.rx_bytes, c.isconnected())")
    assert st[0] > 0 and st[1] > 0 and st[2] is True


def test_tls_wrong_ca_and_wrong_host_refused(broker, dev_factory, tmp_path):
    from broker import make_ca
    other = make_ca(str(tmp_path / "other"), cn="some other CA")
    d = dev_factory(SETUP)
    err = d.call("""
new(%d, %r)
try:
    await c.connect(timeout=10)
except Exception as e:
    return "refused: %%r" %% (e,)
return "connected"
""" % (broker.tls_port, other["ca.pem"]))
    assert err.startswith("refused") and "signed by the trusted CA" in err, err
    # the right CA but a name the certificate does not carry
    err = d.call("""
new(%d, %r, host="broker.example.com")
try:
    await c.connect(timeout=10)
except Exception as e:
    return "refused: %%r" %% (e,)
return "connected"
""" % (broker.tls_port, broker.ca))
    assert err.startswith("refused") and "CN" in err, err
    # DER CA file and the right name work
    import subprocess
    der = str(tmp_path / "ca.der")
    subprocess.run(["openssl", "x509", "-in", broker.ca, "-outform", "der", "-out", der], check=True)
    assert d.call("new(%d, %r)\nreturn await c.connect(timeout=10)" % (broker.tls_port, der)) is False
    # a CA file with no certificate is an error at context creation
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    err = d.call("""
try:
    ssl_context(%r)
except ValueError as e:
    return str(e)
""" % str(bad))
    assert "no certificate" in err


def test_user_password(dev_factory):
    from broker import Broker
    b = Broker(os.path.join(broker_dir(), "b"), users={"alice": "s3cret-pw"}).start()
    try:
        d = dev_factory(SETUP)
        r = d.call("""
new(%d, user="alice", password="wrong")
try:
    await c.connect()
except MQTTException as e:
    return e.args
""" % b.port)
        assert r[0] == 5 and "not authorized" in r[1]
        assert d.call('new(%d, user="alice", password="s3cret-pw")\nreturn await c.connect()'
                      % b.port) is False
    finally:
        b.stop()


def test_last_will_when_device_dies(broker, dev_factory, peers):
    peer = peers(broker.port, subs=("dev/status",))
    peer.settle()
    d = dev_factory(SETUP)
    d.call("""
new(%d, keepalive=30)
c.set_last_will("dev/status", "offline", retain=True)
await c.connect()
await c.publish("dev/status", "online", retain=True, qos=1)
""" % broker.port)
    peer.wait_topic("dev/status", b"online")
    d.kill()
    m = peer.wait_topic("dev/status", b"offline", timeout=10)
    assert m[1] == b"offline"
    # the will was set with retain=True: a subscriber arriving later gets it as a retained message
    p2 = peers(broker.port, subs=("dev/status",))
    m = p2.wait_topic("dev/status", b"offline")
    assert m[1] == b"offline" and m[2] is True


def test_keepalive_pings_keep_idle_link_and_detect_dead_link(broker, dev_factory):
    ka = 2
    px = Proxy(broker.port)
    try:
        d = dev_factory(SETUP)
        d.start("new(%d, keepalive=%d)\nawait c.run()" % (px.port, ka))
        d.wait_event(lambda e: e["ev"] == "up")
        time.sleep(3 * ka)                     # idle: only pings keep it alive
        assert not d.evs("down")
        assert d.call("return c.pings") >= 2
        t0 = time.monotonic()
        px.blackhole(True)                     # half-open: nothing passes, no FIN/RST
        _, e = d.wait_event(lambda e: e["ev"] == "down", timeout=3 * ka)
        took = e["host_t"] - t0
        assert took <= 1.5 * ka + 0.4, took   # detected within 1.5 x keepalive
        assert "nothing received" in e["why"]
        px.blackhole(False)
        d.wait_event(lambda e: e["ev"] == "up", timeout=10, start=1)
        assert d.call("return (c.connects, c.reconnects)") == (2, 1)
    finally:
        px.close()


def test_reconnect_backoff_is_exponential_jittered_and_capped(dev_factory):
    # nothing listens on the port: every attempt fails at once
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = dev_factory(SETUP)
    r = d.call("""
new(%d, backoff_min=0.05, backoff_max=0.4)
c.log = lambda m: ev("log", m=m)
import asyncio
t = asyncio.create_task(c.run())
await asyncio.sleep_ms(2500)
t.cancel()
return [c.backoff_ms(n) for n in range(1, 9) for _ in range(20)]
""" % port)
    ts = [e["t"] for e in d.evs("log") if "connect failed" in e["m"]]
    assert len(ts) >= 6
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    # delay n is within [d/2, d] of min(max, min * 2^(n-1)) (+ scheduling slack)
    for n, g in enumerate(gaps[:5], start=1):
        full = min(400, 50 << (n - 1))
        assert full / 2 - 5 <= g <= full + 60, (n, g, gaps)
    assert max(gaps) <= 400 + 60
    # the jitter really varies and stays in range, and the cap holds
    by_n = [r[i * 20:(i + 1) * 20] for i in range(8)]
    for n, vals in enumerate(by_n, start=1):
        full = min(400, 50 << (n - 1))
        assert all(full // 2 <= v <= full for v in vals), (n, vals)
        assert len(set(vals)) > 3
    msg = [e["m"] for e in d.evs("log")][0]
    assert "connect failed" in msg


def test_broker_restart_recovers_and_resends_unacked_qos1(broker, dev_factory, peers):
    d = dev_factory(SETUP)
    d.start("new(%d, keepalive=5, backoff_min=2, backoff_max=3)\nawait c.run()" % broker.port)
    d.wait_event(lambda e: e["ev"] == "up")
    broker.stop()
    d.wait_event(lambda e: e["ev"] == "down", timeout=5)
    # published while the broker is away: waits in the in-flight list (retained, so the peer
    # below sees it however the device's reconnect and the peer's subscribe are ordered)
    n = d.start('await c.publish("dev/q1", "while-down", qos=1, retain=True)\nreturn "acked"')
    time.sleep(1.0)
    broker.start()
    peer = peers(broker.port, subs=("dev/#",))
    peer.settle()
    # the device reconnects by itself; QoS 1 message goes out with a new packet id
    d.wait_event(lambda e: e["ev"] == "up", timeout=15, start=1)
    assert d.result(n, timeout=10) == "acked"
    peer.wait_topic("dev/q1", b"while-down")


def test_qos1_retransmitted_with_dup_then_new_id_after_reconnect(dev_factory):
    """A broker that never acknowledges: DUP retransmissions with the same packet id, then
    the link is dropped and the message goes again with a new id on the next connection."""
    def handler(fb, c, k):
        t, body = read_packet(c)
        assert t == 0x10
        c.sendall(b"\x20\x02\x00\x00")
        while True:
            t, body = read_packet(c)
            if t & 0xF0 == 0x30:
                tl = int.from_bytes(body[:2], "big")
                pid = int.from_bytes(body[2 + tl:4 + tl], "big")
                fb.log.append((k, t, pid))
                if k >= 1:
                    c.sendall(bytes([0x40, 2]) + pid.to_bytes(2, "big"))
    fb = FakeBroker(handler)
    try:
        d = dev_factory(SETUP)
        d.start("new(%d, keepalive=30, ack_timeout=0.4, retries=2, backoff_min=0.1)\n"
                "await c.run()" % fb.port)
        d.wait_event(lambda e: e["ev"] == "up")
        assert d.call('await c.publish("a/b", "x", qos=1)\nreturn c.retransmits', timeout=15) == 2
        log = fb.log
        first = [x for x in log if x[0] == 0]
        assert [x[1] for x in first] == [0x32, 0x3A, 0x3A]      # DUP set on retransmissions
        assert len({x[2] for x in first}) == 1                  # same packet id
        second = [x for x in log if x[0] == 1]
        assert second[0][1] == 0x32 and second[0][2] != first[0][2]   # new id, no DUP
        assert "no acknowledgement" in d.output()
    finally:
        fb.close()


MALFORMED = [
    ("qos3", b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    ("long remaining length", b"\x30\xff\xff\xff\xff\x01", "remaining length"),
    ("oversized SUBACK", b"\x90\x80\x80\x40", "oversized"),
    ("oversized PUBLISH, QoS 3", b"\x36\x80\x80\x40\x00\x01a", "QoS 3"),
    ("oversized PUBLISH, topic beyond packet", b"\x30\x80\x10\xff\xffab", "topic length"),
    ("server CONNECT", b"\x10\x02\x00\x00", "unexpected packet"),
    ("PUBACK length", b"\x40\x03\x00\x01\x00", "malformed packet type 0x40"),
    ("topic beyond packet", b"\x30\x04\x00\x09ab", "topic length"),
    ("PUBREL flags", b"\x60\x02\x00\x01", "malformed packet type 0x60"),
    ("wildcard topic", b"\x30\x05\x00\x03a/#", "wildcard"),
    ("bad SUBACK code", b"\x90\x03\x00\x01\x07", "SUBACK"),
    ("PINGRESP with body", b"\xd0\x01\x00", "PINGRESP"),
]


def test_malformed_packets_close_the_link_with_a_reason(dev_factory):
    def handler(fb, c, k):
        read_packet(c)
        c.sendall(b"\x20\x02\x00\x00")
        if k < len(MALFORMED):
            c.sendall(MALFORMED[k][1])
        else:  # finally a well-behaved broker: a good message gets through
            c.sendall(publish_pkt("ok/topic", "fine"))
        time.sleep(2)
    fb = FakeBroker(handler)
    try:
        d = dev_factory(SETUP)
        d.start("new(%d, keepalive=30, backoff_min=0.02, backoff_max=0.05, max_packet=512)\n"
                "await c.run()" % fb.port)
        d.wait_event(lambda e: e["ev"] == "msg" and e["topic"] == "ok/topic", timeout=20)
        downs = [e["why"] for e in d.evs("down")]
        assert len(downs) >= len(MALFORMED)
        for (name, _, reason), why in zip(MALFORMED, downs):
            assert reason in why, (name, why)
        assert d.call("return c.isconnected()") is True     # survived all of them
        assert not fb.errors
    finally:
        fb.close()


def test_oversized_publish_is_skipped_in_place_and_acknowledged(dev_factory):
    """PUBLISHes larger than the receive buffer (QoS 0, 1, 2; sent in pieces, and one retained
    that comes again on every connect) are skipped: acknowledged per QoS, counted, reported
    through on_big, never a reason to drop the link; the messages around them get through."""
    seen = {}

    def handler(fb, c, k):
        read_packet(c)
        c.sendall(b"\x20\x02\x00\x00")
        big = publish_pkt("client/evil/active", b"x" * 3000, retain=True)
        for i in range(0, len(big), 700):      # in pieces, as TCP delivers it
            c.sendall(big[i:i + 700])
            time.sleep(0.02)
        c.sendall(publish_pkt("a/1", "one"))
        c.sendall(publish_pkt("a/big1", b"y" * 5000, qos=1, pid=5) + publish_pkt("a/2", "two"))
        seen["ack1"] = read_packet(c)
        c.sendall(publish_pkt("a/big2", b"z" * 2100, qos=2, pid=6))
        seen["rec"] = read_packet(c)
        c.sendall(b"\x62\x02\x00\x06")
        seen["comp"] = read_packet(c)
        c.sendall(publish_pkt("a/3", "three"))
        time.sleep(3)
    fb = FakeBroker(handler)
    try:
        d = dev_factory(SETUP + r'''
def big(t, n, r):
    ev("big", topic=t.decode(), size=n, retain=r)
''')
        d.start("new(%d, keepalive=30)\nc.on_big = big\nawait c.run()" % fb.port)
        d.wait_event(lambda e: e["ev"] == "msg" and e["msg"] == "three", timeout=20)
        assert [e["msg"] for e in d.evs("msg")] == ["one", "two", "three"]
        assert [(e["topic"], e["size"], e["retain"]) for e in d.evs("big")] == [
            ("client/evil/active", 3023, True), ("a/big1", 5013, False), ("a/big2", 2113, False)]
        assert not d.evs("down")
        assert seen["ack1"] == (0x40, b"\x00\x05")
        assert seen["rec"] == (0x50, b"\x00\x06")
        assert seen["comp"] == (0x70, b"\x00\x06")
        assert d.call("return c.skipped, c.isconnected(), c.connects") == (3, True, 1)
        assert "skipped oversized message on b'a/big1': 5013 bytes (max 2048)" in d.output()
        assert not fb.errors
    finally:
        fb.close()


def test_keepalive_above_the_brokers_limit_falls_back_to_one_it_accepts(dev_factory):
    """An MQTT 3.1.1 broker with a keepalive limit (mosquitto max_keepalive 10) refuses a
    longer keepalive with CONNACK 'identifier rejected': the client asks for less until it
    is accepted, instead of retrying the same keepalive forever."""
    asked = []

    def handler(fb, c, k):
        t, body = read_packet(c)
        ka = int.from_bytes(body[8:10], "big")
        asked.append(ka)
        if ka > 10 or not ka:
            c.sendall(b"\x20\x02\x00\x02")
            return
        c.sendall(b"\x20\x02\x00\x00")
        while True:
            t, body = read_packet(c)
            if t == 0xC0:
                c.sendall(b"\xd0\x00")
    fb = FakeBroker(handler)
    try:
        d = dev_factory(SETUP)
        d.start("new(%d, keepalive=120, backoff_min=0.05, backoff_max=0.1)\nawait c.run()"
                % fb.port)
        d.wait_event(lambda e: e["ev"] == "up", timeout=15)
        assert asked == [120, 60, 30, 15, 10]
        assert d.call("return c.keepalive, c.ka_want, c.isconnected()") == (10, 120, True)
        assert "broker refused the connection with keepalive 120 s: trying 60 s" in d.output()
        assert not fb.errors
    finally:
        fb.close()


def test_qos2_inbound_delivered_exactly_once(dev_factory):
    """Broker sends a QoS 2 PUBLISH, then a DUP of it before PUBREL: one delivery; after
    PUBREL the same id is a new message."""
    seen = {}

    def handler(fb, c, k):
        read_packet(c)
        c.sendall(b"\x20\x02\x00\x00")
        c.sendall(publish_pkt("cmd/x", "once", qos=2, pid=7))
        seen["rec1"] = read_packet(c)
        c.sendall(publish_pkt("cmd/x", "once", qos=2, pid=7, dup=True))
        seen["rec2"] = read_packet(c)
        c.sendall(b"\x62\x02\x00\x07")
        seen["comp"] = read_packet(c)
        c.sendall(publish_pkt("cmd/x", "second", qos=2, pid=7))
        seen["rec3"] = read_packet(c)
        c.sendall(b"\x62\x02\x00\x07")
        seen["comp2"] = read_packet(c)
        time.sleep(1)
    fb = FakeBroker(handler)
    try:
        d = dev_factory(SETUP)
        d.call("new(%d, keepalive=30)\nawait c.connect()" % fb.port)
        d.wait_event(lambda e: e["ev"] == "msg" and e["msg"] == "second")
        time.sleep(0.2)
        assert [e["msg"] for e in d.evs("msg")] == ["once", "second"]
        assert seen["rec1"] == (0x50, b"\x00\x07") == seen["rec2"] == seen["rec3"]
        assert seen["comp"] == (0x70, b"\x00\x07") == seen["comp2"]
    finally:
        fb.close()


def test_outbox_latest_value_wins_and_bounded(dev_factory):
    d = dev_factory(SETUP)
    r = d.call("""
new(1, outbox_items=4, outbox_bytes=1000)
for v in range(5):
    assert c.queue("m/soc", str(v), retain=True, latest=True)
c.queue("n/1", "note1", qos=1)
c.queue("m/speed", "10", latest=True)
c.queue("n/2", "note2", qos=1)
c.queue("m/soc", "99", latest=True)        # replaces in place, no growth
full = c.queue("m/range", "100", latest=True)   # full: oldest latest-value entry dropped
kept = [(e[0], e[1]) for e in c._ob]
c.queue("n/3", "note3", qos=1)               # full: drops the oldest metric, not a note
c.queue("n/4", "note4", qos=1)
ok5 = c.queue("n/5", "note5", qos=1)         # only notes left: refused, counted
return full, kept, [(e[0], e[1]) for e in c._ob], ok5, c.dropped
""")
    full, kept, final, ok5, dropped = r
    assert full is True
    assert kept == [(b"n/1", b"note1"), (b"m/speed", b"10"), (b"n/2", b"note2"), (b"m/range", b"100")]
    assert final == [(b"n/1", b"note1"), (b"n/2", b"note2"), (b"n/3", b"note3"), (b"n/4", b"note4")]
    assert ok5 is False
    assert dropped == 4


def test_outbox_drains_in_order_when_link_comes_up(broker, dev_factory, peers):
    peer = peers(broker.port, subs=("ob/#",))
    peer.settle()
    d = dev_factory(SETUP)
    d.call("""
new(%d, keepalive=30)
for i in range(6):
    c.queue("ob/n", "n%%d" %% i, qos=1)
c.queue("ob/m", "old", latest=True)
c.queue("ob/m", "new", latest=True)
import asyncio
asyncio.create_task(c.run())
""" % broker.port)
    peer.wait_topic("ob/m", b"new")
    peer.wait(lambda m: m[1] == b"n5")
    time.sleep(0.3)
    assert [m[1] for m in peer.got("ob/n")] == [b"n%d" % i for i in range(6)]
    assert [m[1] for m in peer.got("ob/m")] == [b"new"]
    assert d.call("return c.queued()") == 0


def test_client_fits_small_heap(broker, dev_factory):
    """Import + connected TLS client + traffic within the device heap (compiled modules)."""
    d = dev_factory(SETUP, heap="100K")
    r = d.call("""
import gc
gc.collect()
a = gc.mem_free()
new(%d, %r, keepalive=30)
await c.connect()
await c.subscribe("x/#", 1)
for i in range(50):
    await c.publish("x/%%d" %% i, "v" * 100, qos=i %% 2)
gc.collect()
return a - gc.mem_free()
""" % (broker.tls_port, broker.ca))
    print("client instance + connection heap: %d B" % r)
    # 16.2 KB measured with the cached broker address, skipped-message and keepalive-fallback
    # state (host bytes; about half on the ESP32)
    assert r < 16500


def test_qos2_exactly_once_across_a_lost_link_with_a_persistent_session(broker, dev_factory,
                                                                       peers):
    """Real mosquitto, persistent session: the device gets a QoS 2 message but its PUBREC is
    lost with the link; after the reconnect the broker sends the message again (DUP) and the
    device must not deliver it a second time."""
    px = Proxy(broker.port)
    try:
        d = dev_factory(SETUP)
        d.start("""
new(%d, keepalive=30, cid="q2dev", clean_session=False, backoff_min=0.2, backoff_max=0.5)
async def up(sp):
    ev("up", sp=sp)
    await c.subscribe("cmd/q2", 2)
    ev("subscribed")
c.on_up = up
await c.run()
""" % px.port)
        d.wait_event(lambda e: e["ev"] == "subscribed")
        peer = peers(broker.port, subs=())
        px.hole_c2s = True                        # PUBREC from the device will be lost
        peer.publish("cmd/q2", "run-once", qos=2)
        d.wait_event(lambda e: e["ev"] == "msg" and e["msg"] == "run-once")
        time.sleep(0.3)
        px.drop()                                 # the link dies before PUBREC arrived
        px.hole_c2s = False
        _, e = d.wait_event(lambda e: e["ev"] == "up" and e["sp"] is True, timeout=15)
        time.sleep(1.5)                           # broker redelivers (DUP) and completes
        msgs = [x for x in d.evs("msg") if x["msg"] == "run-once"]
        assert len(msgs) == 1, msgs
        assert d.call("return len(c._rx2)") == 0  # released by PUBREL after the reconnect
        assert d.call("return c.duplicates") >= 1 # the broker did send it again
        # a new message with the same content is delivered again (new packet id)
        peer.publish("cmd/q2", "run-once", qos=2)
        d.wait_event(lambda e: len([x for x in d.evs("msg") if x["msg"] == "run-once"]) == 2,
                     timeout=10)
    finally:
        px.close()


def test_dns_lookup_once_then_cached_until_a_connect_fails(broker):
    """getaddrinfo blocks the event loop (lwIP waits for the DNS server): one lookup, reused by
    every reconnect; a failed connect forgets it (the address may have changed)."""
    from util import run_mpy, compiled_lib
    out = run_mpy("""
import sys, asyncio, socket as _s
calls = [0]
class S:
    def __getattr__(self, k):
        return getattr(_s, k)
    def getaddrinfo(self, *a):
        calls[0] += 1
        return _s.getaddrinfo(*a)
sys.modules["socket"] = S()
from ovms.mqtt import MQTTClient
async def main():
    c = MQTTClient("dns-test", "localhost", %d)
    for i in range(3):
        await c.connect()
        await c.disconnect()
        c._stop = False
    print("LOOKUPS", calls[0])
    c.port = %d           # another port (looked up: 2), nobody listens: the connect fails
    try:
        await c.connect(timeout=2)
    except OSError:
        pass
    c.port = %d           # back, after the failure: looked up again (3)
    await c.connect()
    await c.disconnect()
    print("LOOKUPS", calls[0])
asyncio.run(main())
""" % (broker.port, 1, broker.port), path=(compiled_lib(),)).stdout
    assert [ln for ln in out.splitlines() if ln.startswith("LOOKUPS")] == ["LOOKUPS 1",
                                                                          "LOOKUPS 3"], out
