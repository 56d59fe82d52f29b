#!/usr/bin/env python3
"""make sim: a local TLS broker + the virtual device replaying a real drive, until Ctrl-C."""
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
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            return free_port()


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(REPO, ".sim"), help="state directory")
    ap.add_argument("--log", default=DRIVE, help="candump -L log to replay (looped)")
    ap.add_argument("--vehicle", default="RV", help="vehicle type (firmware/vehicles/<code>)")
    ap.add_argument("--id", default="SIM1", help="vehicle id")
    ap.add_argument("--speed", default="1")
    ap.add_argument("--heap", default="100K", help="the ESP32 heap to emulate (vdev --heap)")
    ap.add_argument("--fresh", action="store_true", help="erase the virtual flash first")
    a = ap.parse_args(argv)

    os.makedirs(a.dir, exist_ok=True)
    flash = os.path.join(a.dir, "flash")
    if a.fresh:
        shutil.rmtree(flash, ignore_errors=True)
    broker = Broker(os.path.join(a.dir, "broker"), tls_port=port_or_free(8883),
                    port=port_or_free(1883)).start()
    pty = os.path.join(a.dir, "pty")
    dev = subprocess.Popen([sys.executable, os.path.join(TOOLS, "vdev.py"), "run", "--root", flash,
                            "--can-log", a.log, "--speed", a.speed, "--pty", pty, "--heap", a.heap,
                            "--log", os.path.join(a.dir, "console.log")],
                           stdout=subprocess.PIPE, text=True)

    def stop(*_):
        dev.terminate()
        broker.stop()
        print("\nsim stopped.")
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    wait_line(dev, "can-tx")
    prov = [sys.executable, os.path.join(TOOLS, "ovms.py"), "--port", pty, "provision",
            "--wifi", "sim-car", "sim-password", "--mqtt-host", "localhost",
            "--mqtt-port", str(broker.tls_port), "--ca", broker.ca, "--type", a.vehicle,
            "--id", a.id]
    r = subprocess.run(prov, capture_output=True, text=True, timeout=120)
    if r.returncode:
        print("sim: provisioning failed:\n" + r.stdout + r.stderr, file=sys.stderr)
    ca = os.path.relpath(broker.ca)
    print(f"""
micro-ovms virtual device is running ({a.vehicle}, id {a.id}), replaying
  {os.path.relpath(a.log)}
broker: mosquitto TLS on localhost:{broker.tls_port} (CA {ca}), plain on 127.0.0.1:{broker.port}

watch:   mosquitto_sub -h 127.0.0.1 -p {broker.port} -t 'ovms/#' -v
shell:   .venv/bin/python tools/ovms.py --mqtt mqtts://localhost:{broker.tls_port} --ca {ca} --vehicle {a.id} shell "stat"
attach:  .venv/bin/mpremote connect {os.path.relpath(pty)} repl     (Ctrl-C stops the app, Ctrl-D reboots)
console: {os.path.relpath(os.path.join(a.dir, 'console.log'))}

Ctrl-C here powers the device off.""", flush=True)
    while dev.poll() is None:
        time.sleep(0.5)
    broker.stop()
    return dev.returncode


if __name__ == "__main__":
    sys.exit(main())
