"""ovms.py over the serial port: shell commands, config and provisioning through the raw REPL.

Works the same on a real module (/dev/ttyUSB0) and on the virtual device's pty. It uses
mpremote's serial transport: Ctrl-C + Ctrl-A enter the raw REPL (this stops the running
firmware, as any mpremote use does), the command runs in the device's shell, and if the firmware
was running it is restarted with a soft reset (Ctrl-B, Ctrl-D: boot.py + main.py run again), so
the module is left as it was found. provision always soft-resets (to apply the new settings).

The serial console is a secure (enable-mode) session: whoever holds the cable already has the
Python REPL, so a password there would protect nothing.
"""
import sys
import time

# exit codes
OK = 0
DEVICE_ERROR = 1      # the device ran the command and reported an error
LINK_ERROR = 2        # no device, no firmware, timeout, bad local input

ERROR_PREFIXES = ("Error", "Unrecognised command", "Usage:")
CA_PATH = "/store/ca.pem"
OTA_PUB_PATH = "/store/ota.pub"
MAX_PEM = 16384
CHUNK = 512


class LinkError(Exception):
    """The serial link or the device's Python side failed (not a shell-level error)."""


def is_error(reply):
    return reply.lstrip().startswith(ERROR_PREFIXES)


def quote(word):
    """Quote one word for the device shell (double quotes, \\" and \\\\ escaped)."""
    if word and not any(c in word for c in ' \t"\\'):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command_line(words):
    return " ".join(quote(w) for w in words)


class Device:
    """A raw-REPL session with the module (mpremote's SerialTransport).

    was_running tells whether Ctrl-C interrupted something (the firmware, or a boot in progress)
    rather than finding an idle REPL prompt: then close() restarts the firmware."""

    def __init__(self, port, timeout=10.0):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport
        self.timeout = timeout
        self._terr = TransportError
        try:
            self.t = SerialTransport(port, baudrate=115200, timeout=timeout)
        except (TransportError, OSError) as e:
            raise LinkError("cannot open %s: %s" % (port, e))
        for attempt in (1, 2):     # a busy or booting module may miss the first Ctrl-A
            try:
                ran = self._interrupt()
                self.was_running = ran if attempt == 1 else self.was_running or ran
                self.t.enter_raw_repl(soft_reset=False, timeout_overall=timeout)
                break
            except (TransportError, OSError) as e:
                if attempt == 2 or isinstance(e, OSError):
                    self.t.close()
                    raise LinkError("no MicroPython raw REPL on %s: %s" % (port, e))

    def _quiet_read(self, quiet, overall):
        # everything the device sends until it has been quiet for `quiet` seconds
        return self.t.read_until(1, b"\x00\xff\x00", timeout=quiet, timeout_overall=overall)

    def _interrupt(self):
        self._quiet_read(0.05, 0.5)          # stale output (e.g. an earlier boot's log)
        end = time.monotonic() + self.timeout
        while True:
            self.t.serial.write(b"\r\x03")
            seen = self._quiet_read(0.4, 2.0).decode("utf-8", "replace")
            # no answer at all: the module is between reboots, ask again
            if seen.strip() or time.monotonic() > end:
                break
        # an idle friendly REPL only answers with a fresh prompt
        return seen.replace(">>> ", "").strip() != ""

    def exec(self, code):
        """Run Python on the device; returns its stdout (text). LinkError on an exception."""
        try:
            out, err = self.t.exec_raw(code, timeout=self.timeout)
        except (self._terr, OSError) as e:
            raise LinkError("device did not answer: %s" % e)
        if err:
            raise LinkError("device error: %s" % err.decode("utf-8", "replace").strip())
        return out.decode("utf-8", "replace").replace("\r\n", "\n")

    def close(self, reset=False):
        """Leave the raw REPL; reset=True soft-resets so the firmware (main.py) starts again.
        Returns what the device printed while restarting (up to 'ready' or a quiet second)."""
        seen = b""
        try:
            self.t.exit_raw_repl()
            if reset:
                self.t.serial.write(b"\x04")
                seen = self.t.read_until(1, b"soft reboot", timeout=min(self.timeout, 5))
                seen += self._quiet_read(0.3, 2.0)  # let the boot get going
        except (self._terr, OSError):
            pass
        finally:
            try:
                self.t.close()
            except Exception:
                pass
        return seen.decode("utf-8", "replace")


PREP = """
try:
    from ovms import config as _ocf
    if not _ocf.loaded():
        for _w in _ocf.load():
            print(_w)
except ImportError:
    pass
"""


def prepare(dev):
    """Load the device's config if the firmware has not yet (interrupted early in its boot);
    its warnings go to stderr, never into a command's reply."""
    for w in dev.exec(PREP).splitlines():
        print("device: " + w, file=sys.stderr)


SHELL_SETUP = """
try:
    from ovms import shell as _osh
except ImportError as e:
    raise ImportError('no ovms.shell on the device: %s' % e)
_ocs = _osh.Session('serial', max_out=1 << 20)
_ocs.secure = True
"""


def shell_code(line):
    return "print(_osh.run(%r, _ocs))" % line


def run_shell(dev, line):
    return dev.exec(shell_code(line)).rstrip("\n")


def _print_reply(reply, line=None, as_json=False):
    if as_json:
        import json
        import cli_json
        print(json.dumps(cli_json.reply(line, reply), indent=1, ensure_ascii=False))
    elif reply:
        print(reply)
    return DEVICE_ERROR if is_error(reply) else OK


def cmd_shell(dev, args):
    dev.exec(SHELL_SETUP)
    if args.command:
        return _print_reply(run_shell(dev, args.command), args.command, args.json)
    # interactive: one line at a time, the same secure session throughout
    rc = OK
    while True:
        try:
            line = input("OVMS# ")
        except (EOFError, KeyboardInterrupt):
            print()
            return rc
        line = line.strip()
        if line in ("exit", "quit"):
            return rc
        if line:
            rc = _print_reply(run_shell(dev, line))


CONFIG_USAGE = "usage: config list [param] | get <param> <instance> | set <param> <instance> <value> | rm <param> <instance>"


def config_line(words):
    """Shell line for `config list|get|set|rm ...`; LinkError (usage) if the words do not fit."""
    n = {"list": (1, 2), "get": (3, 3), "set": (4, 4), "rm": (3, 3)}.get(words[0])
    if n is None or not n[0] <= len(words) <= n[1]:
        raise LinkError(CONFIG_USAGE)
    return "config " + command_line(words)


def cmd_line(args):
    """The shell line of `config ...` / `metrics ...` (checked words)."""
    if args.cmd == "config":
        return config_line(args.words)
    return "metrics " + command_line(args.words)


def cmd_config(dev, args):
    dev.exec(SHELL_SETUP)
    line = cmd_line(args)
    return _print_reply(run_shell(dev, line), line, args.json)


# ---- provisioning ---------------------------------------------------------------------

def read_pem(path, what):
    """Read and check a PEM file on the host; LinkError with a clear message if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as e:
        raise LinkError("cannot read %s %s: %s" % (what, path, e.strerror or e))
    if len(data) > MAX_PEM:
        raise LinkError("%s %s is too large (> %d bytes)" % (what, path, MAX_PEM))
    if what == "CA certificate":
        try:
            from cryptography import x509
            certs = x509.load_pem_x509_certificates(data)
        except Exception as e:
            raise LinkError("%s %s is not a PEM certificate: %s" % (what, path, e))
        if not certs:
            raise LinkError("%s %s holds no certificate" % (what, path))
    else:
        try:
            from cryptography.hazmat.primitives import serialization
            serialization.load_pem_public_key(data)
        except Exception as e:
            raise LinkError("%s %s is not a PEM public key: %s" % (what, path, e))
    return data


PLAIN_REFUSED = ("refusing to configure the broker without TLS: the MQTT password and all data "
                 "would cross the network unencrypted. Give --ca CA_PEM (the broker's CA, TLS) or, "
                 "to accept that, --insecure-plain-mqtt")


def broker_target(args):
    """(host, port or None, tls) that provision configures, from --mqtt URL or --mqtt-host/-port
    (tls: --ca given or mqtts://); host None when no broker is given. LinkError if they clash."""
    host, port, tls = args.mqtt_host, args.mqtt_port, bool(args.ca)
    if args.mqtt:
        import cli_link
        if host or port is not None:
            raise LinkError("give the broker once: --mqtt URL or --mqtt-host/--mqtt-port")
        try:
            utls, host, port = cli_link.parse_url(args.mqtt)
        except cli_link.CliError as e:
            raise LinkError(str(e))
        if utls and not args.ca:
            raise LinkError("mqtts:// needs --ca CA_PEM (the broker's CA, installed on the module)")
        if args.ca and not utls:
            raise LinkError("--ca given with mqtt:// (plain TCP); use mqtts://")
        tls = utls
    return host, port, tls


def provision_items(args):
    """(param, instance, value) list for the provision options (host side, before any I/O).
    Never configures plain MQTT unless asked to (--insecure-plain-mqtt): LinkError."""
    items = []
    if args.wifi:
        ssid, pw = args.wifi
        items += [("wifi.ssid", ssid, pw), ("auto", "wifi.mode", "client"),
                  ("auto", "wifi.ssid.client", ssid)]
    host, port, tls = broker_target(args)
    if host and not tls and not getattr(args, "insecure_plain_mqtt", False):
        raise LinkError(PLAIN_REFUSED)
    if host:
        items.append(("server.v3", "server", host))
    if port is not None:
        items.append(("server.v3", "port", str(port)))
    elif host:
        items.append(("server.v3", "port", "8883" if tls else "1883"))
    if args.user is not None:
        items.append(("server.v3", "user", args.user))
    if args.password is not None:
        items.append(("password", "server.v3", args.password))
    if tls:
        items += [("server.v3", "ca", CA_PATH), ("server.v3", "tls", "yes")]
    elif host:
        items.append(("server.v3", "tls", "no"))
    if args.prov_type:
        items.append(("vehicle", "type", args.prov_type))
    if args.id:
        items.append(("vehicle", "id", args.id))
    return items


CHECK_CODE = """
from ovms import config as _ocf
try:
    _its = %r
    for _p, _i, _v in _its:
        _ocf.check(_p, _i, _v)
    _t = [_v for _p, _i, _v in _its if (_p, _i) == ('server.v3', 'tls')]
    _cred = [1 for _p, _i, _v in _its if (_p, _i) in (('password', 'server.v3'),
                                                     ('server.v3', 'user'), ('server.v3', 'server'))]
    if _cred and not %r and not (_t[0] == 'yes' if _t else _ocf.get('server.v3', 'tls')):
        print('Error: the module is set to plain MQTT (server.v3 tls no): ' + %r)
    else:
        print('OK')
except ValueError as e:
    print('Error: %%s' %% e)
"""

FILE_OPEN = """
import os as _oos
_ofn = %r
_d = ''
for _x in _ofn.split('/')[1:-1]:
    _d += '/' + _x
    try:
        _oos.mkdir(_d)
    except OSError:
        pass
_of = open(_ofn + '.tmp', 'wb')
"""

FILE_CLOSE = """
_of.close()
_n = _oos.stat(_ofn + '.tmp')[6]
if _n != %d:
    raise OSError('short write: %%d bytes' %% _n)
try:
    _oos.rename(_ofn + '.tmp', _ofn)
except OSError:
    _oos.remove(_ofn)
    _oos.rename(_ofn + '.tmp', _ofn)
print('wrote', _ofn, _n)
"""

UPDATE_CODE = """
try:
    _ocf.update(%r)
    for _p, _i, _v in %r:
        print('%%s %%s: %%s' %% (_p, _i, _ocf.display(_p, _i)))
except Exception as e:
    print('Error: %%s' %% e)
"""


def put_file(dev, path, data):
    """Write data to path on the device (temp file + rename: never a half-written file)."""
    dev.exec(FILE_OPEN % path)
    for k in range(0, len(data), CHUNK):
        dev.exec("_of.write(%r)" % data[k:k + CHUNK])
    return dev.exec(FILE_CLOSE % len(data)).strip()


def cmd_provision(dev, args, files, items):
    if not items and not files:
        print("provision: nothing to do (give --wifi, --mqtt, --ca, --type, --id ...)",
              file=sys.stderr)
        return LINK_ERROR
    # 1. validate everything on the device first: nothing is written if one value is bad
    # (also: no credentials or broker onto a module left on plain MQTT, unless asked to)
    r = dev.exec(CHECK_CODE % (items, bool(getattr(args, "insecure_plain_mqtt", False)),
                               PLAIN_REFUSED)).strip()
    if r != "OK":
        print(r)
        return DEVICE_ERROR
    # 2. files (CA, OTA key), each replaced atomically
    for path, data in files:
        print(put_file(dev, path, data))
    # 3. all config values in one write
    r = dev.exec(UPDATE_CODE % (items, items)).rstrip("\n")
    print(r)
    return DEVICE_ERROR if is_error(r) else OK


open_device = Device  # (tests substitute a device double here)


def main(args):
    files = []
    try:
        if args.cmd == "provision":
            items = provision_items(args)
            if args.ca:
                files.append((CA_PATH, read_pem(args.ca, "CA certificate")))
            if getattr(args, "ota_pubkey", None):
                files.append((OTA_PUB_PATH, read_pem(args.ota_pubkey, "OTA public key")))
        elif args.cmd in ("config", "metrics"):
            cmd_line(args)
        elif args.cmd == "shell" and args.json and not args.command:
            raise LinkError("--json needs a command (the interactive shell prints text)")
        elif args.cmd != "shell":
            print("error: '%s' is not available over the serial port (use --mqtt)" % args.cmd,
                  file=sys.stderr)
            return LINK_ERROR
        dev = open_device(args.port, args.timeout)
    except LinkError as e:
        print("error: %s" % e, file=sys.stderr)
        return LINK_ERROR
    rc = LINK_ERROR
    reset = False
    try:
        reset = dev.was_running
        prepare(dev)
        if args.cmd == "shell":
            rc = cmd_shell(dev, args)
        elif args.cmd in ("config", "metrics"):
            rc = cmd_config(dev, args)
        else:
            rc = cmd_provision(dev, args, files, items)
            if rc == OK:
                reset = "provision"
    except LinkError as e:
        print("error: %s" % e, file=sys.stderr)
        rc = LINK_ERROR
    finally:
        if not reset:
            try:
                dev.exec("_osh = _ocs = _ocf = None")
            except LinkError:
                pass
        out = dev.close(reset=reset)
        if reset == "provision":
            print("soft reset: %s" % ("done" if "soft reboot" in out else "sent"))
    return rc
