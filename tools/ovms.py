#!/usr/bin/env python3
"""ovms: the one host command for a module (serial port or MQTT)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_parser():
    p = argparse.ArgumentParser(prog="ovms.py", description=__doc__)
    link = p.add_argument_group("link (one of --port or --mqtt)")
    link.add_argument("--port", help="serial port of the module (/dev/ttyUSB0 or a virtual device pty)")
    link.add_argument("--mqtt", help="broker URL: mqtts://HOST:PORT (TLS) or mqtt://HOST:PORT")
    link.add_argument("--ca", help="CA certificate (PEM) for mqtts://")
    link.add_argument("--user", help="MQTT user name (also the <user> of the topic prefix)")
    link.add_argument("--password", help="MQTT password")
    link.add_argument("--vehicle", help="vehicle id (the <vehicleid> of the topic prefix)")
    link.add_argument("--prefix", help="topic prefix (default ovms/<user>/<vehicle>/)")
    link.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("shell", help="run one shell command (or an interactive shell)")
    s.add_argument("command", nargs="?", help="command line, e.g. \"metrics list v.b\"")

    c = sub.add_parser("config", help="config list|get|set|rm on the module")
    c.add_argument("words", nargs="+", help="list [param] | get P I | set P I V | rm P I")

    v = sub.add_parser("provision", help="write Wi-Fi, broker, CA and vehicle config, then soft-reset")
    v.add_argument("--wifi", nargs=2, metavar=("SSID", "PASS"))
    v.add_argument("--mqtt-host")
    v.add_argument("--mqtt-port", type=int)
    v.add_argument("--mqtt-user")
    v.add_argument("--mqtt-password")
    v.add_argument("--ca", dest="prov_ca", metavar="CA_PEM")
    v.add_argument("--vehicle", dest="prov_vehicle", metavar="TYPE")
    v.add_argument("--id", dest="prov_id", metavar="VEHICLEID")
    v.add_argument("--ota-pubkey", metavar="PUB_PEM", help="OTA public key (from `ota keygen`)")

    o = sub.add_parser("ota", help="signed over-the-air updates")
    osub = o.add_subparsers(dest="ota_cmd", required=True)
    k = osub.add_parser("keygen", help="make an OTA signing key pair")
    k.add_argument("--key-file", required=True, help="private key to write (public key: FILE.pub)")
    push = osub.add_parser("push", help="build, sign and push an app bundle over MQTT")
    push.add_argument("--key-file", required=True)
    push.add_argument("--version")
    push.add_argument("--allow-downgrade", action="store_true",
                      help="sign the bundle as a deliberate downgrade (anti-rollback lets it in)")
    push.add_argument("--new-pubkey", metavar="PUB_PEM",
                      help="key rotation: the module's OTA key becomes this one (signed with the old)")
    push.add_argument("--firmware", metavar="IMAGE", help="push a MicroPython firmware image instead")
    push.add_argument("source", nargs="?", help="app source dir (default: this repo)")
    osub.add_parser("status", help="show running/staged/previous versions")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "ota" and args.ota_cmd == "keygen":
        import cli_ota
        return cli_ota.keygen(args)
    if args.port:
        import cli_serial
        return cli_serial.main(args)
    if args.mqtt:
        if args.cmd == "ota":
            import cli_ota
            return cli_ota.main(args)
        import cli_mqtt
        return cli_mqtt.main(args)
    print("error: give --port PORT (serial) or --mqtt URL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
