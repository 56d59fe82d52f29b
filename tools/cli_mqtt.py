"""ovms.py over MQTT: run shell commands on a module via <prefix>client/<cid>/command/<id>."""
import os
import ssl
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

FAIL_PREFIXES = ("Error", "Unrecognised command", "Usage:")
HISTORY = os.path.expanduser("~/.ovms_history")
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


def default_prefix(user, vehicle):
    """OVMS v3 default topic prefix: ovms/<user>/<vehicle id>/ (id segment dropped if empty)."""
    return "ovms/%s/" % (user or "") + ("%s/" % vehicle if vehicle else "")


def failed(reply):
    """True if a shell reply reports an error (exit code 1)."""
    return reply.lstrip().startswith(FAIL_PREFIXES)


class CliError(Exception):
    pass


class Link:
    """One MQTT connection acting as an OVMS v3 client (unique client id per process)."""

    def __init__(self, url, ca=None, user=None, password=None, prefix="", timeout=10.0, qos=1):
        import paho.mqtt.client as mqtt
        u = urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise CliError("bad --mqtt URL %r: use mqtts://HOST:PORT or mqtt://HOST:PORT" % url)
        self.tls = u.scheme == "mqtts"
        self.host = u.hostname
        self.port = u.port or (8883 if self.tls else 1883)
        self.prefix = prefix
        self.timeout = timeout
        self.qos = qos
        self.cid = "ovmscli-" + uuid.uuid4().hex[:12]
        self.base = "%sclient/%s/" % (prefix, self.cid)
        self._cond = threading.Condition()
        self._replies = {}
        self._connected = None      # None = waiting, else reason code
        self._subscribed = False
        self._seq = 0
        self.module_password = None     # set: every command is signed with it
        self._ctr = 0
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
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    # paho callbacks (network thread)
    def _on_connect(self, c, userdata, flags, rc, props=None):
        with self._cond:
            self._connected = rc
            self._cond.notify_all()
        if not rc.is_failure:
            c.subscribe(self.base + "response/+", qos=1)

    def _on_subscribe(self, c, userdata, mid, rcs, props=None):
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, c, userdata, msg):
        cmd_id = msg.topic.rsplit("/", 1)[-1]
        with self._cond:
            self._replies[cmd_id] = msg.payload
            self._cond.notify_all()

    def _wait(self, pred, timeout):
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
        if not self._wait(lambda: self._connected is not None, self.timeout):
            self.close()
            raise CliError("no answer from broker %s:%d within %.0f s" % (self.host, self.port, self.timeout))
        if self._connected.is_failure:
            rc = self._connected
            self.close()
            raise CliError("broker refused the connection: %s" % rc)
        if not self._wait(lambda: self._subscribed, self.timeout):
            self.close()
            raise CliError("broker did not confirm the subscription")
        return self

    def command(self, line, timeout=None):
        """Publish one command; returns the reply text, or None on time-out."""
        self._seq += 1
        cmd_id = "%d%s" % (self._seq, uuid.uuid4().hex[:6])
        payload = line.encode("utf-8")
        if self.module_password is not None:
            self._ctr = max(self._ctr + 1, time.time_ns() // 1000000)
            payload = sign(self.module_password, self.cid, cmd_id, line, self._ctr)
        info = self.c.publish(self.base + "command/" + cmd_id, payload, qos=self.qos)
        if info.rc != 0:
            raise CliError("publish failed (rc %d)" % info.rc)
        if not self._wait(lambda: cmd_id in self._replies, self.timeout if timeout is None else timeout):
            return None
        with self._cond:
            b = self._replies.pop(cmd_id)
        return b.decode("utf-8", "replace")

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def quote(w):
    """One word for the module's shell (double quotes group words, \\ escapes)."""
    if w and not any(c in w for c in ' \t"\\'):
        return w
    return '"%s"' % w.replace("\\", "\\\\").replace('"', '\\"')


def _line(args):
    if args.cmd == "config":
        return "config " + " ".join(quote(w) for w in args.words)
    return args.command


def _interactive(link):
    try:
        import readline
        try:
            readline.read_history_file(HISTORY)
        except OSError:
            pass
        readline.set_history_length(1000)
    except ImportError:
        readline = None
    print("Connected to %s:%d as %s (prefix %s). 'exit' or Ctrl-D to leave." % (
        link.host, link.port, link.cid, link.prefix))
    rc = 0
    try:
        while True:
            try:
                line = input("OVMS> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            s = line.strip()
            if not s:
                continue
            if s in ("exit", "quit"):
                break
            r = link.command(s)
            if r is None:
                print("error: no response within %.0f s" % link.timeout, file=sys.stderr)
                rc = 1
            else:
                print(r)
    finally:
        if readline:
            try:
                readline.write_history_file(HISTORY)
            except OSError:
                pass
    return rc


def main(args):
    """Entry point from tools/ovms.py (args: mqtt, ca, user, password, vehicle, prefix, timeout, cmd...)."""
    if args.cmd not in ("shell", "config"):
        print("error: '%s' is not available over MQTT (use --port)" % args.cmd, file=sys.stderr)
        return 2
    prefix = args.prefix
    if prefix is None:
        if not args.vehicle:
            print("error: give --vehicle ID (or --prefix)", file=sys.stderr)
            return 2
        prefix = default_prefix(args.user, args.vehicle)
    elif prefix and not prefix.endswith("/"):
        prefix += "/"
    line = _line(args)
    try:
        link = Link(args.mqtt, args.ca, args.user, args.password, prefix, args.timeout).connect()
    except CliError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    try:
        link.module_password = os.environ.get(PASSWORD_ENV)
        if line is None:
            return _interactive(link)
        r = link.command(line)
        if r is None:
            print("error: no response from the module within %.0f s (is it online? topic %scommand/...)"
                  % (args.timeout, link.base), file=sys.stderr)
            return 1
        print(r)
        return 1 if failed(r) else 0
    except CliError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    finally:
        link.close()
