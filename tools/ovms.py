#!/usr/bin/env python3
"""ovms: the one host command for a module (over its serial port or over MQTT)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Options shared by every subcommand, accepted before or after it with one meaning:
# (flags, dest, argparse keywords). Given in both places with different values: an error.
COMMON = (
    (("-p", "--port"), "port", dict(help="serial port of the module (/dev/ttyUSB0, a virtual "
                                          "device pty): the link for shell/config/metrics, and "
                                          "the only link of provision, deploy and flash")),
    (("--mqtt",), "mqtt", dict(metavar="URL", help="the module's broker: mqtts://HOST:PORT (TLS) "
                                                   "or mqtt://HOST:PORT; the link for shell/config/"
                                                   "metrics/ota, and what provision configures")),
    (("--ca",), "ca", dict(metavar="CA_PEM", help="CA certificate (PEM) of the broker: verifies "
                                                  "mqtts://, and provision installs it on the "
                                                  "module")),
    (("--user",), "user", dict(help="MQTT user name (the <user> of the topic prefix; provision "
                                    "stores it on the module)")),
    (("--password",), "password", dict(help="MQTT password (provision stores it, write-only)")),
    (("--id",), "id", dict(metavar="VEHICLEID", help="vehicle id (the <vehicleid> of the topic "
                                                     "prefix; provision stores it)")),
    (("--prefix",), "prefix", dict(help="topic prefix (default ovms/<user>/<vehicleid>/)")),
    (("--timeout",), "timeout", dict(type=float, help="seconds to wait for a reply (default 10)")),
    (("--json",), "json", dict(action="store_true", help="print data as JSON (shell, config, "
                                                         "metrics, ota status)")),
)
DEFAULTS = {"timeout": 10.0, "json": False}
ALIASES = {"user": ("--mqtt-user",), "password": ("--mqtt-password",)}   # provision's old names


class Ambiguous(argparse.Action):
    """--vehicle meant the vehicle id before a subcommand and the vehicle type after provision."""

    def __call__(self, parser, ns, values, option_string=None):
        raise argparse.ArgumentError(self, "is ambiguous and no longer accepted: use --id "
                                           "VEHICLEID (the vehicle id of the topic prefix) or, "
                                           "with provision, --type TYPE (the vehicle type)")


def _common(p, top, aliases=False):
    g = p.add_argument_group("module link and identity (before or after the subcommand)")
    for flags, dest, kw in COMMON:
        if aliases:
            flags = flags + ALIASES.get(dest, ())
        if kw.get("action") != "store_true":
            kw = dict(kw, metavar=kw.get("metavar", dest.upper()))
        g.add_argument(*flags, dest=("top_" if top else "") + dest, default=argparse.SUPPRESS,
                       **kw)
    g.add_argument("--vehicle", action=Ambiguous, help=argparse.SUPPRESS)


def _sub(sub, name, **kw):
    p = sub.add_parser(name, allow_abbrev=False, **kw)
    _common(p, False, aliases=name == "provision")
    return p


def build_parser():
    p = argparse.ArgumentParser(prog="ovms.py", description=__doc__, allow_abbrev=False)
    _common(p, True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = _sub(sub, "shell", help="run one shell command (or an interactive shell)")
    s.add_argument("command", nargs="?", help="command line, e.g. \"metrics list v.b\"")

    c = _sub(sub, "config", help="config list|get|set|rm on the module")
    c.add_argument("words", nargs="+", help="list [param] | get P I | set P I V | rm P I")

    m = _sub(sub, "metrics", help="metrics list|get|set on the module")
    m.add_argument("words", nargs="+", help="list [-a] [filter] | get NAME | set NAME VALUE")

    v = _sub(sub, "provision", help="write Wi-Fi, broker, CA and vehicle config over the serial "
                                    "port, then soft-reset")
    v.add_argument("--wifi", nargs=2, metavar=("SSID", "PASS"))
    v.add_argument("--mqtt-host", help="broker host (or give --mqtt URL)")
    v.add_argument("--mqtt-port", type=int, help="broker port (default 8883 with --ca)")
    v.add_argument("--type", dest="prov_type", metavar="TYPE",
                   help="vehicle type (firmware/vehicles/<TYPE>)")
    v.add_argument("--ota-pubkey", metavar="PUB_PEM", help="OTA public key (from `ota keygen`)")
    v.add_argument("--insecure-plain-mqtt", action="store_true",
                   help="allow configuring the broker without TLS: the MQTT password and all "
                        "data then cross the network unencrypted (without this flag a broker "
                        "needs --ca)")

    o = _sub(sub, "ota", help="signed over-the-air updates")
    osub = o.add_subparsers(dest="ota_cmd", required=True, metavar="OTA_COMMAND")
    k = _sub(osub, "keygen", help="make an OTA signing key pair")
    k.add_argument("--key-file", required=True, help="private key to write (public key: FILE.pub)")
    push = _sub(osub, "push", help="build, sign and push an app bundle over MQTT")
    push.add_argument("--key-file", required=True)
    push.add_argument("--version")
    push.add_argument("--allow-downgrade", action="store_true",
                      help="sign the bundle as a deliberate downgrade (anti-rollback lets it in)")
    push.add_argument("--new-pubkey", metavar="PUB_PEM",
                      help="key rotation: the module's OTA key becomes this one (signed with the old)")
    push.add_argument("--firmware", metavar="IMAGE", help="push a MicroPython firmware image instead")
    push.add_argument("source", nargs="?", help="app source dir (default: this repo)")
    _sub(osub, "status", help="show running/staged/previous versions")

    d = _sub(sub, "deploy", help="compile lib/ and copy the app to a module (mpremote)")
    d.add_argument("--arch", default="xtensawin",
                   help="mpy-cross -march: xtensawin (ESP32, S3), rv32imc (C3, C6), x64 (the "
                        "virtual device), or auto (ask the device)")
    d.add_argument("--source", help="repo to deploy (default: this one)")
    d.add_argument("--no-compile", action="store_true", help="copy .py sources instead of .mpy")
    d.add_argument("--dry-run", action="store_true", help="build and print the mpremote commands")

    f = _sub(sub, "flash", help="erase and write the firmware image (esptool)")
    f.add_argument("--image", help="merged firmware image (default build/firmware/firmware.bin)")
    f.add_argument("--baud", type=int, default=460800)
    f.add_argument("--no-erase", action="store_true", help="keep the flash (filesystem) contents")
    f.add_argument("--esptool", help="esptool executable (default: the venv's)")
    f.add_argument("--dry-run", action="store_true", help="detect and print the commands only")

    k = _sub(sub, "package", help="write package.json (for mpremote mip install)")
    k.add_argument("--check", action="store_true", help="fail if package.json is out of date")
    return p


def parse(argv=None):
    """Parse argv; the shared options merged from both positions (an error if they disagree)."""
    p = build_parser()
    a = p.parse_args(argv)
    for flags, dest, kw in COMMON:
        top = getattr(a, "top_" + dest, None)
        here = getattr(a, dest, None)
        if top is not None and here is not None and top != here:
            p.error("%s given twice with different values (%r before the subcommand, %r after)"
                    % ("/".join(flags), top, here))
        val = here if here is not None else top
        setattr(a, dest, DEFAULTS.get(dest) if val is None else val)
        if hasattr(a, "top_" + dest):
            delattr(a, "top_" + dest)
    a.vehicle = None
    return a


# which link each command takes: "port", "mqtt", "either" (exactly one of them), or None
LINKS = {"shell": "either", "config": "either", "metrics": "either", "provision": "port",
         "deploy": "port", "flash": "port", "package": None, "keygen": None, "push": "mqtt",
         "status": "mqtt"}


def _link_error(a, name):
    need = LINKS[name]
    if need == "either":
        if a.port and a.mqtt:
            return "give one link: -p/--port PORT (serial) or --mqtt URL, not both"
        if not (a.port or a.mqtt):
            return "give -p/--port PORT (serial) or --mqtt URL"
    elif need == "port":
        if not a.port:
            return "%s needs -p/--port PORT (the module's serial port)" % name
        if a.mqtt and name != "provision":
            return "%s works over the serial port only (drop --mqtt)" % name
    elif need == "mqtt":
        if not a.mqtt:
            return "ota %s needs --mqtt URL (it runs over MQTT)" % name
        if a.port:
            return "ota %s runs over MQTT only (drop -p/--port)" % name
    if need in ("either", "mqtt") and a.mqtt and not (a.id or a.prefix):
        return "give --id VEHICLEID (or --prefix): the topic prefix is ovms/<user>/<vehicleid>/"
    return None


def main(argv=None):
    try:
        args = parse(argv)
    except SystemExit as e:
        return e.code
    name = args.ota_cmd if args.cmd == "ota" else args.cmd
    err = _link_error(args, name)
    if err:
        print("error: " + err, file=sys.stderr)
        return 2
    if name == "keygen":
        import cli_ota
        return cli_ota.keygen(args)
    if name == "package":
        import mkpackage
        return mkpackage.run(args)
    if name == "deploy":
        import deploy
        return deploy.run(args)
    if name == "flash":
        import flash
        return flash.run(args)
    if args.cmd == "ota":
        import cli_ota
        return cli_ota.main(args)
    if args.port:
        import cli_serial
        return cli_serial.main(args)
    import cli_mqtt
    return cli_mqtt.main(args)


if __name__ == "__main__":
    sys.exit(main())
