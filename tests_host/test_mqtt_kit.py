"""Helpers for the MQTT tests: compiled device lib, device agent, TCP proxy, fake broker, peer.

No tests here. The device side runs on the real micropython binary as an "agent": the test
sends snippets of (async) device code over stdin and gets their results back, while the
device's own tasks (MQTT link, server) keep running between calls.
"""
import ast
import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from util import MICROPYTHON, compiled_lib


# ---- device lib compiled like on the device (bytecode in .mpy, not source) ------------------


def build_lib():
    """lib/ compiled to .mpy for this host's micropython, once per session (util.compiled_lib).

    The device runs compiled (or frozen) modules; compiling source at import time needs
    far more heap than the modules themselves, so tests load .mpy files like the device."""
    return compiled_lib()


AGENT = r'''
import sys
sys.path[:0] = %(path)r
import asyncio, json, time
def ev(kind, **kw):
    kw["ev"] = kind
    kw["t"] = time.ticks_ms()
    print("V " + json.dumps(kw))
%(setup)s
_g = globals()
async def _run(n, code):
    try:
        exec("async def _f%%s():\n%%s" %% (n, code), _g)
        r = await _g["_f" + n]()
        print("R %%s %%r" %% (n, r))
    except BaseException as e:
        print("E %%s %%r" %% (n, e))
async def _agent():
    r = asyncio.StreamReader(sys.stdin)
    while True:
        line = await r.readline()
        if not line:
            break
        n, code = line.decode().split(" ", 1)
        asyncio.create_task(_run(n, json.loads(code)))
    print("X agent end")
asyncio.run(_agent())
'''


class DevError(Exception):
    pass


class Dev:
    """A micropython process running device code; call() runs async snippets in it."""

    def __init__(self, setup="", heap="100K", cwd=None, lib=None):
        self.script = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        self.script.write(AGENT % {"path": [lib or build_lib()], "setup": setup})
        self.script.close()
        self.p = subprocess.Popen([MICROPYTHON, "-X", "heapsize=" + heap, self.script.name],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=cwd)
        self.lines = []
        self.events = []
        self.results = {}
        self.cond = threading.Condition()
        self.n = 0
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            with self.cond:
                self.lines.append(line)
                if line.startswith("V "):
                    try:
                        e = json.loads(line[2:])
                    except ValueError:
                        e = {"ev": "bad", "line": line}
                    e["host_t"] = time.monotonic()
                    self.events.append(e)
                elif line.startswith(("R ", "E ")):
                    k, n, v = line.split(" ", 2)
                    self.results[n] = (k, v)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def start(self, code):
        """Start a snippet (body of an async function; may `return`); returns its id."""
        self.n += 1
        n = str(self.n)
        body = "".join("    " + ln + "\n" for ln in code.strip("\n").split("\n"))
        self.p.stdin.write("%s %s\n" % (n, json.dumps(body)))
        self.p.stdin.flush()
        return n

    def result(self, n, timeout=20):
        end = time.monotonic() + timeout
        with self.cond:
            while n not in self.results:
                left = end - time.monotonic()
                if left <= 0 or self.p.poll() is not None and n not in self.results:
                    raise DevError("no result for call %s (device alive: %s)\n%s"
                                   % (n, self.p.poll() is None, self.tail()))
                self.cond.wait(min(left, 0.2))
            k, v = self.results.pop(n)
        if k == "E":
            raise DevError(v + "\n" + self.tail())
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v

    def call(self, code, timeout=20):
        return self.result(self.start(code), timeout)

    def wait_event(self, pred, timeout=20, start=0):
        """First event (dict) at index >= start matching pred(e); returns (index, event)."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for k in range(start, len(self.events)):
                    if pred(self.events[k]):
                        return k, self.events[k]
                left = end - time.monotonic()
                if left <= 0:
                    raise DevError("event not seen within %.1f s\n%s" % (timeout, self.tail()))
                if self.p.poll() is not None:
                    raise DevError("device exited\n" + self.tail())
                self.cond.wait(min(left, 0.2))

    def evs(self, kind):
        with self.cond:
            return [e for e in self.events if e.get("ev") == kind]

    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def tail(self, n=40):
        with self.cond:
            return "\n".join(self.lines[-n:])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.t.join(2)

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(3)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.t.join(2)
        try:
            os.unlink(self.script.name)
        except OSError:
            pass


@pytest.fixture
def dev_factory():
    devs = []

    def make(setup="", heap="100K", cwd=None):
        d = Dev(setup, heap, cwd)
        devs.append(d)
        return d
    yield make
    for d in devs:
        d.close()


# ---- TCP proxy (blackholing): tools/netproxy.py, shared with the benchmarks -----------------

from netproxy import Proxy, listener, serve  # noqa: E402,F401


# ---- fake broker (malformed packets) -------------------------------------------------------

def read_packet(c, timeout=10):
    """(first byte, body bytes) of one MQTT packet from socket c."""
    c.settimeout(timeout)

    def rd(n):
        b = b""
        while len(b) < n:
            x = c.recv(n - len(b))
            if not x:
                raise EOFError
            b += x
        return b
    b0 = rd(1)[0]
    n = 0
    sh = 0
    while True:
        x = rd(1)[0]
        n |= (x & 0x7F) << sh
        sh += 7
        if not x & 0x80:
            break
    return b0, rd(n) if n else b""


def enc_len(n):
    out = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        out.append(x | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_pkt(topic, payload, qos=0, pid=0, dup=False, retain=False):
    t = topic.encode() if isinstance(topic, str) else topic
    p = payload.encode() if isinstance(payload, str) else payload
    body = len(t).to_bytes(2, "big") + t + (pid.to_bytes(2, "big") if qos else b"") + p
    return bytes([0x30 | qos << 1 | (8 if dup else 0) | (1 if retain else 0)]) + enc_len(len(body)) + body


class FakeBroker:
    """Accepts connections and runs handler(conn, index) in a thread for each."""

    def __init__(self, handler):
        self.handler = handler
        self.ls, self.port = listener()
        self.count = 0
        self.log = []
        self.errors = []
        self.alive = True
        serve(self, self._accept)

    def _accept(self, c):
        self.count += 1
        threading.Thread(target=self._run, args=(c, self.count - 1), daemon=True).start()

    def _run(self, c, k):
        try:
            self.handler(self, c, k)
        except (EOFError, OSError):
            pass
        except Exception as e:  # a bug in the test handler: make it visible
            self.errors.append(repr(e))
        finally:
            c.close()

    def close(self):
        self.alive = False
        self.ls.close()


# ---- host-side MQTT peer (paho) ------------------------------------------------------------

class Peer:
    """paho-mqtt client on the host collecting every message it receives."""

    def __init__(self, port, subs=("#",), ca=None, cid=None, user=None, password=None,
                 will=None):
        import paho.mqtt.client as mqtt
        self.msgs = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid or "",
                             protocol=mqtt.MQTTv311, clean_session=True)
        if user:
            self.c.username_pw_set(user, password)
        if ca:
            self.c.tls_set(ca_certs=ca)
        if will:
            self.c.will_set(*will)
        self.c.on_message = self._msg
        self.subs = list(subs)
        self.c.on_connect = self._conn
        self.ok = threading.Event()
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        if not self.ok.wait(10):
            raise RuntimeError("peer could not connect")

    def _conn(self, c, u, flags, rc, props=None):
        for s in self.subs:
            c.subscribe(s, qos=2)
        # a no-op publish round trip makes sure the subscriptions are active
        self.ok.set()

    def _msg(self, c, u, m):
        with self.cond:
            self.msgs.append((m.topic, m.payload, m.retain, m.qos, time.monotonic()))
            self.cond.notify_all()

    def settle(self, topic="peer/settle"):
        """Wait until the subscriptions are active (a message to ourselves comes back)."""
        tok = "%f" % time.monotonic()
        self.c.subscribe(topic, 1)
        for _ in range(50):
            self.publish(topic, tok, qos=1)
            if self.wait(lambda m: m[0] == topic and m[1] == tok.encode(), 0.2, need=False):
                return
        raise RuntimeError("peer subscription not active")

    def publish(self, topic, payload, qos=0, retain=False):
        i = self.c.publish(topic, payload, qos=qos, retain=retain)
        i.wait_for_publish(10)

    def wait(self, pred, timeout=10, need=True):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.msgs:
                    if pred(m):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    if need:
                        raise AssertionError("message not received; got: %r"
                                             % [(m[0], m[1][:60]) for m in self.msgs[-30:]])
                    return None
                self.cond.wait(left)

    def wait_topic(self, topic, payload=None, timeout=10):
        return self.wait(lambda m: m[0] == topic and (payload is None or m[1] == payload),
                         timeout)

    def got(self, topic):
        with self.cond:
            return [m for m in self.msgs if m[0] == topic]

    def all(self):
        with self.cond:
            return list(self.msgs)

    def clear(self):
        with self.cond:
            self.msgs = []

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def peers():
    ps = []

    def make(*a, **kw):
        p = Peer(*a, **kw)
        ps.append(p)
        return p
    yield make
    for p in ps:
        try:
            p.stop()
        except Exception:
            pass


# ---- broker in a directory the broker process can read -------------------------------------

def broker_dir():
    """A temp dir readable by mosquitto: started as root it drops to the `mosquitto` user,
    which cannot enter pytest's private (0700) tmp_path."""
    d = tempfile.mkdtemp(prefix="mqtt-broker-")
    os.chmod(d, 0o755)
    atexit.register(shutil.rmtree, d, True)     # no litter in /tmp after the run
    return d


@pytest.fixture
def broker():
    """Like conftest's broker (real mosquitto, TLS + plain, test CA), in broker_dir()."""
    from broker import Broker
    d = broker_dir()
    b = Broker(os.path.join(d, "b")).start()
    yield b
    b.stop()
    shutil.rmtree(d, ignore_errors=True)
