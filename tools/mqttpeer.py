"""An owner's MQTT client for tests and benchmarks: watch a module's topics, run shell commands."""
import queue
import ssl
import time


class NoMessage(AssertionError):
    """The awaited message did not come in time."""


class Client:
    """Subscribed to <prefix>#, over TLS to the broker (tools/broker.py) on localhost."""

    def __init__(self, broker, prefix, client_id="e2e-test"):
        import paho.mqtt.client as mqtt
        self.q = queue.Queue()
        self.prefix = prefix
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.tls_set(ca_certs=broker.ca, cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, m.payload.decode()))
        self.c.connect("localhost", broker.tls_port)
        self.c.subscribe(prefix + "#", qos=1)
        self.c.loop_start()
        self.n = 0

    def wait(self, topic, pred=lambda v: True, timeout=60):
        """The next payload on <prefix>topic that pred accepts."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                t, v = self.q.get(timeout=max(0.1, end - time.time()))
            except queue.Empty:
                break
            if t == self.prefix + topic and pred(v):
                return v
        raise NoMessage("no %s within %d s" % (topic, timeout))

    def command(self, line, cid="tester"):
        """Run a shell command over client/<cid>/command/<n>; its response text."""
        self.n += 1
        self.c.publish("%sclient/%s/command/%d" % (self.prefix, cid, self.n), line, qos=1)
        return self.wait("client/%s/response/%d" % (cid, self.n), timeout=30)

    def number(self, metric):
        """`metrics get METRIC` as an int."""
        out = self.command("metrics get " + metric)
        try:
            return int(float(out.split()[-1]))
        except (ValueError, IndexError):
            raise NoMessage("%s: %r" % (metric, out))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()
