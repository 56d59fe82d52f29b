"""Virtual-device link: sockets to the host side (tools/vdev.py) that plays the hardware."""
import _thread
import os
import socket
import struct

SEQPACKET = 5

_path = os.getenv("VDEV_HW")
_ctl = None
state = {"wifi": 1, "rssi": -58, "idle": 1}


def connect(hello):
    """Open a record socket to the host and introduce ourselves."""
    s = socket.socket(socket.AF_UNIX, SEQPACKET)
    s.connect(struct.pack("H", socket.AF_UNIX) + _path.encode() + b"\0")
    s.write(hello)
    return s


def _reader(s):
    while True:
        try:
            msg = s.recv(64)  # one record (readinto would wait to fill the buffer)
        except OSError:
            return
        if not msg:
            return
        words = msg.split()
        if words == [b"IDLE"]:
            state["idle"] = 1
        elif len(words) == 2 and words[0] in (b"WIFI", b"RSSI"):
            state[words[0].decode().lower()] = int(words[1])


def start():
    """Open the control link (called once at boot)."""
    global _ctl
    if _path and _ctl is None:
        _ctl = connect(b"CTL")
        _thread.start_new_thread(_reader, (_ctl,))


def running(how):
    """Tell the host how Ctrl-C acts from now on: b"1" code runs (KeyboardInterrupt), b"B" boot.py
    runs (a Ctrl-C is held for main.py, as a host connecting at power-on means it), b"0" the REPL
    reads input (a plain character). Leaving for the REPL waits until the host has confirmed, so
    an interrupt it sent for the code that just ended is taken here, not inside the REPL."""
    import time
    if _ctl is None:
        return
    state["idle"] = 0
    ctl(b"RUN " + how)
    while how == b"0":
        try:
            while not state["idle"]:
                time.sleep_ms(1)
            for _ in range(2):
                time.sleep_ms(0)  # a late KeyboardInterrupt surfaces here
            return
        except KeyboardInterrupt:
            pass


def ctl(msg):
    """Send one control message (bytes) to the host; ignore a missing host."""
    if _ctl is None:
        return
    try:
        _ctl.write(msg)
    except OSError:
        pass
