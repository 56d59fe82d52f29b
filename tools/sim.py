#!/usr/bin/env python3
"""make sim: a local TLS broker with a password + the virtual device replaying a real drive,
set up as a real OVMS module (until Ctrl-C)."""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from broker import Broker, free_port  # noqa: E402

DRIVE = os.path.join(REPO, "firmware", "vehicles", "rv", "logs", "comma2k19_rav4_seg40.log.gz")


def port_or_free(p):
    import socket
    with socket.socket() as s:
        # as mosquitto and socketcand bind: connections of a previous run in TIME_WAIT (a quick
        # restart) must not move the broker to another port than the README's lines show
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            return free_port()


USER = "sim"     # the MQTT account of the module and of its owner's tools (as an OVMS server account)


def secret_file(path, make):
    """The text in path, made once with make() (mode 0600) and kept for the next runs."""
    try:
        with open(path) as f:
            v = f.read().strip()
        if v:
            return v
    except OSError:
        pass
    v = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(v + "\n")
    return v


def ota_key(path):
    """The OTA signing key pair path, path.pub for `ota push` against the sim (made once)."""
    if not os.path.exists(path):
        import argparse
        import cli_ota
        with open(os.devnull, "w") as null:
            out, sys.stdout = sys.stdout, null
            try:
                cli_ota.keygen(argparse.Namespace(key_file=path))
            finally:
                sys.stdout = out
    return path


def start_broker(state, tls_port=None, port=None):
    """The sim's broker, started: only the account USER, with the password generated once into
    STATE/mqtt-password. Returns (broker, password, password file)."""
    import secrets
    pw_file = os.path.join(state, "mqtt-password")
    password = secret_file(pw_file, lambda: secrets.token_urlsafe(12))
    # mosquitto password_file (hashed, made by mosquitto_passwd); anonymous clients refused
    broker = Broker(os.path.join(state, "broker"), tls_port=tls_port, port=port,
                    users={USER: password}).start()
    return broker, password, pw_file


CAN_PORT = 29536    # socketcand's own default port, so the `can:` line stays the same between runs


def usage(state, port, tls_port, ca, password, pw_file, vid, key, pty, can_port=CAN_PORT):
    """The lines `make sim` prints: the broker and account, then commands that work as printed
    from the repository root (the README shows the same lines)."""
    rel = os.path.relpath
    pw = '"$(cat %s)"' % rel(pw_file)
    cli = (".venv/bin/python tools/ovms.py --mqtt mqtts://localhost:%d --ca %s --user %s "
           "--password %s --id %s" % (tls_port, ca, USER, pw, vid))
    return "\n".join((
        "broker:  mosquitto, TLS on localhost:%d (CA %s), plain on 127.0.0.1:%d;" % (tls_port, ca, port),
        "         user %s, password %s (in %s); topics ovms/%s/%s/" % (USER, password, rel(pw_file),
                                                                     USER, vid),
        "",
        "watch:   mosquitto_sub -h 127.0.0.1 -p %d -u %s -P %s -t 'ovms/#' -v" % (port, USER, pw),
        "shell:   %s shell \"stat\"" % cli,
        "metrics: %s metrics list v.p --json" % cli,
        "ota:     %s ota push --key-file %s" % (cli, rel(key)),
        "attach:  .venv/bin/mpremote connect %s repl     (Ctrl-C stops the app, Ctrl-D reboots)"
        % rel(pty),
        "can:     .venv/bin/python -m can.logger -i socketcand -c can0 --bus-kwargs host=127.0.0.1 "
        "port=%d" % can_port,
        "console: %s" % rel(os.path.join(state, "console.log"))))


def wait_line(proc, key, timeout=60):
    end = time.time() + timeout
    info = {}
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        k, _, v = line.partition(": ")
        info[k] = v.strip()
        if k == key:
            return info
    raise SystemExit("sim: the virtual device did not start (see %s)" % proc.args)


def gps_log_for(can_log):
    """The NMEA log recorded with a CAN log: same name, .nmea instead of .log(.gz), or None."""
    base = can_log[:-3] if can_log.endswith(".gz") else can_log
    p = (base[:-4] if base.endswith(".log") else base) + ".nmea"
    return p if os.path.exists(p) else None


def deploy_vehicle(vdir, lib):
    """A vehicle directory of the user's, compiled into the flash's /lib (the device loads it
    like a shipped one); returns its code."""
    import vehicles
    src = vehicles.build(vdir, lib, mpy=True, warn=lambda m: print("sim: " + m, file=sys.stderr))
    os.remove(src)
    return vehicles.compile_vehicle(vdir)["code"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(REPO, ".sim"), help="state directory")
    ap.add_argument("--log", default=DRIVE, help="candump -L log to replay (looped)")
    ap.add_argument("--vehicle", default="RV", help="vehicle type (firmware/vehicles/<code>), or "
                    "a directory with a vehicle.json of your own (built and put on the flash)")
    ap.add_argument("--id", default="SIM1", help="vehicle id")
    ap.add_argument("--speed", default="1")
    # 160K: a module with PSRAM, whose heap also holds an app that `ota push` put into a slot
    # (code from .mpy files is in the heap); 100K is a plain ESP32, which runs only the frozen app
    ap.add_argument("--heap", default="160K", help="the ESP32 heap to emulate (vdev --heap)")
    ap.add_argument("--fresh", action="store_true", help="erase the virtual flash first")
    ap.add_argument("--gps-log", help="NMEA log for the board's GPS receiver (default: a "
                    "*.nmea recorded with the drive, next to the CAN log, if there is one)")
    a = ap.parse_args(argv)
    gps = a.gps_log or gps_log_for(a.log)

    os.makedirs(a.dir, exist_ok=True)
    flash = os.path.join(a.dir, "flash")
    if a.fresh:
        shutil.rmtree(flash, ignore_errors=True)
    key = ota_key(os.path.join(a.dir, "ota.key"))
    broker, password, pw_file = start_broker(a.dir, port_or_free(8883), port_or_free(1883))
    can_port = port_or_free(CAN_PORT)
    pty = os.path.join(a.dir, "pty")
    dev = subprocess.Popen([sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root", flash,
                            "--can-log", a.log, "--speed", a.speed, "--pty", pty, "--heap", a.heap,
                            "--socketcand-port", str(can_port), "--log", os.path.join(a.dir, "console.log")]
                           + (["--gps-log", gps] if gps else []),
                           stdout=subprocess.PIPE, text=True)

    def stop(*_):
        dev.terminate()
        broker.stop()
        print("\nsim stopped.")
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    wait_line(dev, "can-tx")
    vtype = a.vehicle
    if os.path.isfile(os.path.join(a.vehicle, "vehicle.json")):
        vtype = deploy_vehicle(a.vehicle, os.path.join(flash, "lib"))
    if gps:     # a receiver on the UART: the GPS task starts with the app (provision resets it)
        subprocess.run([sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", pty, "config",
                        "set", "gps", "enabled", "yes"], capture_output=True, text=True, timeout=120)
    prov = [sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", pty, "provision",
            "--wifi", "sim-car", "sim-password", "--mqtt", "mqtts://localhost:%d" % broker.tls_port,
            "--ca", broker.ca, "--user", USER, "--password", password, "--type", vtype,
            "--id", a.id, "--ota-pubkey", key + ".pub"]
    r = subprocess.run(prov, capture_output=True, text=True, timeout=120)
    if r.returncode:
        print("sim: provisioning failed:\n" + r.stdout + r.stderr, file=sys.stderr)
    print("\nmicro-ovms virtual device is running (%s, id %s), replaying\n  %s\n%s\n\n"
          "Ctrl-C here powers the device off." % (vtype, a.id, os.path.relpath(a.log), usage(
              a.dir, broker.port, broker.tls_port, os.path.relpath(broker.ca), password, pw_file,
              a.id, key, pty, can_port)), flush=True)
    while dev.poll() is None:
        time.sleep(0.5)
    broker.stop()
    return dev.returncode


if __name__ == "__main__":
    sys.exit(main())
