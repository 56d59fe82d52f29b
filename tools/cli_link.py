"""cli_link: the host's one MQTT link to a module (OVMS v3 topic prefix, TLS, auth, commands)."""
import os
import ssl
import threading
import time
import uuid
from urllib.parse import urlsplit

# With the module password in this variable (kept out of argv/history) every command is signed
# (HMAC-SHA256, see sign() and README "Security"): a module with server.v3 commands signed
# then runs secure commands; a module on the default (trusted broker link) runs them anyway.
PASSWORD_ENV = "OVMS_MODULE_PASSWORD"


def sign(password, cid, cmd_id, line, counter):
    """The signed payload of one command (the device checks it in ovms.v3.cmdsig)."""
    import hashlib
    import hmac
    if not isinstance(line, bytes):
        line = line.encode("utf-8")
    msg = b"ovms-cmd1\n%s\n%s\n%d\n%s" % (cid.encode(), cmd_id.encode(), counter, line)
    mac = hmac.new(password.encode("utf-8"), msg, hashlib.sha256).hexdigest()
    return b"!sig1 %d %s\n%s" % (counter, mac.encode(), line)


class CliError(Exception):
    pass


def topic_prefix(user=None, vehicle_id=None, prefix=None):
    """The module's topic prefix, as OVMS v3 builds it: an explicit prefix (a trailing / added),
    else ovms/<mqtt user>/<vehicle id>/ (the user segment stays, empty, when there is no user;
    the id segment is dropped when there is no id)."""
    if prefix:
        return prefix if prefix.endswith("/") else prefix + "/"
    return "ovms/%s/" % (user or "") + ("%s/" % vehicle_id if vehicle_id else "")


def parse_url(url):
    """(tls, host, port) of mqtts://HOST[:PORT] or mqtt://HOST[:PORT]; CliError otherwise."""
    u = urlsplit(url or "")
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname or port == -1:
        raise CliError("bad --mqtt URL %r: use mqtts://HOST:PORT or mqtt://HOST:PORT" % url)
    tls = u.scheme == "mqtts"
    return tls, u.hostname, port or (8883 if tls else 1883)


def quote(w):
    """One word for the module's shell (double quotes group words, \\ escapes)."""
    if w and not any(c in w for c in ' \t"\\'):
        return w
    return '"%s"' % w.replace("\\", "\\\\").replace('"', '\\"')


class Link:
    """One MQTT connection acting as an OVMS v3 client (unique client id per process).

    Topics are below base = <prefix>client/<cid>/: shell commands go out on command/<id> and
    come back on response/<id> (command()); other request/reply protocols (OTA) subscribe()
    their reply topic before connect() and publish() their requests."""

    def __init__(self, url, ca=None, user=None, password=None, prefix="", timeout=10.0,
                 qos=1, cid_prefix="ovmscli-"):
        import paho.mqtt.client as mqtt
        self.tls, self.host, self.port = parse_url(url)
        self.prefix = prefix
        self.timeout = timeout
        self.qos = qos
        self.cid = cid_prefix + uuid.uuid4().hex[:12]
        self.base = "%sclient/%s/" % (prefix, self.cid)
        self._cond = threading.Condition()
        self._replies = {}
        self._connected = None      # None = waiting, else reason code
        self._subscribed = 0
        self._subs = {"response/+": self._on_response}
        self._seq = 0
        self._ctr = 0
        self.up = False
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.cid,
                             protocol=mqtt.MQTTv311, clean_session=True)
        if user:
            self.c.username_pw_set(user, password)
        if self.tls:
            try:
                self.c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                raise CliError("cannot use CA file %s: %s" % (ca, e))
        elif ca:
            raise CliError("--ca given with mqtt:// (plain TCP); use mqtts://")
        self.c.reconnect_delay_set(1, 4)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def subscribe(self, sub, handler):
        """Call handler(payload bytes, topic) for messages on base + sub (give before connect)."""
        self._subs[sub] = handler

    # paho callbacks (network thread)
    def _on_connect(self, c, userdata, flags, rc, props=None):
        with self._cond:
            self._connected = rc
            self.up = not rc.is_failure
            self._cond.notify_all()
        if not rc.is_failure:
            for sub in self._subs:
                c.subscribe(self.base + sub, qos=1)

    def _on_disconnect(self, *a):
        self.up = False

    def _on_subscribe(self, c, userdata, mid, rcs, props=None):
        with self._cond:
            self._subscribed += 1
            self._cond.notify_all()

    def _on_message(self, c, userdata, msg):
        sub = msg.topic[len(self.base):]
        h = self._subs.get(sub) or (self._on_response if sub.startswith("response/") else None)
        if h:
            h(msg.payload, msg.topic)

    def _on_response(self, payload, topic):
        with self._cond:
            self._replies[topic.rsplit("/", 1)[-1]] = payload
            self._cond.notify_all()

    def wait(self, pred, timeout):
        end = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def connect(self):
        try:
            self.c.connect(self.host, self.port, keepalive=60)
        except (OSError, ssl.SSLError) as e:
            raise CliError("cannot connect to %s:%d: %s" % (self.host, self.port, e))
        self.c.loop_start()
        if not self.wait(lambda: self._connected is not None, self.timeout):
            self.close()
            raise CliError("no answer from broker %s:%d within %.0f s" % (self.host, self.port,
                                                                          self.timeout))
        if self._connected.is_failure:
            rc = self._connected
            self.close()
            raise CliError("broker refused the connection: %s" % rc)
        if not self.wait(lambda: self._subscribed >= len(self._subs), self.timeout):
            self.close()
            raise CliError("broker did not confirm the subscription")
        return self

    def publish(self, sub, payload, qos=None):
        info = self.c.publish(self.base + sub, payload, qos=self.qos if qos is None else qos)
        if info.rc != 0:
            raise CliError("publish failed (rc %d)" % info.rc)

    def signed(self, cmd_id, payload):
        """payload signed for cmd_id with the module password of PASSWORD_ENV (as it is when
        the variable is not set); the counter only grows (milliseconds since the epoch)."""
        pw = os.environ.get(PASSWORD_ENV)
        if pw is None:
            return payload
        self._ctr = max(self._ctr + 1, time.time_ns() // 1000000)
        return sign(pw, self.cid, cmd_id, payload, self._ctr)

    def command(self, line, timeout=None):
        """Run one shell command on the module; returns the reply text, or None on time-out.
        The one place where shell commands leave the host (signed, if PASSWORD_ENV is set)."""
        self._seq += 1
        cmd_id = "%d%s" % (self._seq, uuid.uuid4().hex[:6])
        self.publish("command/" + cmd_id, self.signed(cmd_id, line.encode("utf-8")))
        if not self.wait(lambda: cmd_id in self._replies,
                         self.timeout if timeout is None else timeout):
            return None
        with self._cond:
            b = self._replies.pop(cmd_id)
        return b.decode("utf-8", "replace")

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def open_link(args, cid_prefix="ovmscli-", subs=None):
    """A connected Link from the CLI's options (mqtt, ca, user, password, id, prefix, timeout)."""
    if not args.prefix and not args.id:
        raise CliError("give --id VEHICLEID (or --prefix): the topic prefix is "
                       "ovms/<user>/<vehicleid>/")
    link = Link(args.mqtt, args.ca, args.user, args.password,
                topic_prefix(args.user, args.id, args.prefix), args.timeout, cid_prefix=cid_prefix)
    for sub, h in (subs or {}).items():
        link.subscribe(sub, h)
    return link.connect()
