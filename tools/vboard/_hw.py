"""Virtual-device link: sockets to the host side (tools/vdev.py) that plays the hardware."""
import _thread
import os
import socket
import struct
import time

SEQPACKET = 5

_path = os.getenv("VDEV_HW")
_ctl = None
state = {"wifi": 1, "rssi": -58, "idle": 1, "go": 0}


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
        except OSError as e:
            if e.errno == 4:  # EINTR
                continue
            return
        if not msg:
            return
        words = msg.split()
        if words == [b"IDLE"]:
            state["idle"] = 1
        elif words in ([b"GO"], [b"STOP"]):
            state["go"] = 1 if words == [b"GO"] else 2
        elif len(words) == 2 and words[0] in (b"WIFI", b"RSSI"):
            state[words[0].decode().lower()] = int(words[1])


def start():
    """Open the control link (called once at boot)."""
    global _ctl
    if _path and _ctl is None:
        _ctl = connect(b"CTL")
        _thread.start_new_thread(_reader, (_ctl,))


RUN = b"RUN 1"    # code runs: Ctrl-C is a KeyboardInterrupt
BOOT = b"RUN B"   # boot.py runs: a Ctrl-C is held for main.py (a host connecting at power-on)
REPL = b"RUN 0"   # the REPL reads input: Ctrl-C is a plain character
MAIN = b"RUN M"   # main.py starts: runs as RUN, unless a Ctrl-C came during the power-on


def start_main():
    """True if main.py may run; False if the host pressed Ctrl-C while the board powered on
    (the board then stops before main.py instead of interrupting it mid-import)."""
    if _ctl is None:
        return True
    state["go"] = 0
    ctl(MAIN)
    while not state["go"]:
        time.sleep_ms(1)
    return state["go"] == 1


def running(how):
    """Tell the host how Ctrl-C acts from now on (RUN, BOOT or REPL; no allocation: the heap
    may be locked). Leaving for the REPL waits until the host has confirmed, so
    an interrupt it sent for the code that just ended is taken here, not inside the REPL."""
    if _ctl is None:
        return
    state["idle"] = 0
    ctl(how)
    while how is REPL:
        try:
            while not state["idle"]:
                time.sleep_ms(1)
            time.sleep_ms(1)  # a late KeyboardInterrupt surfaces here
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
