"""Virtual-device link: sockets to the host side (tools/vdev.py) that plays the hardware."""
import _thread
import os
import socket
import struct
import time

SEQPACKET = 5

_path = os.getenv("VDEV_HW")
_ctl = None
state = {"wifi": 1, "rssi": -58, "reply": None}


def connect(hello):
    """Open a record socket to the host and introduce ourselves."""
    s = socket.socket(socket.AF_UNIX, SEQPACKET)
    s.connect(struct.pack("H", socket.AF_UNIX) + _path.encode() + b"\0")
    s.write(hello)
    return s


def _take(msg):
    if msg in (b"IDLE", b"GO", b"STOP"):
        state["reply"] = msg
    else:
        words = msg.split()
        if len(words) == 2 and words[0] in (b"WIFI", b"RSSI"):
            state[words[0].decode().lower()] = int(words[1])


def _reader(s):
    # A board's control path (UART interrupt, reset lines) is C, outside the GC heap: a full
    # heap must not stop it. Here a MemoryError waits and retries: recv() allocates before it
    # takes the record off the socket, so no message is lost (a dead reader would leave the
    # firmware waiting for its IDLE reply forever, silent: the raw REPL never ends the command).
    while True:
        try:
            msg = s.recv(64)  # one record (readinto would wait to fill the buffer)
        except OSError as e:
            if e.errno == 4:  # EINTR
                continue
            return
        except MemoryError:
            time.sleep_ms(5)
            continue
        if not msg:
            return
        while True:
            try:
                _take(msg)
                break
            except MemoryError:
                time.sleep_ms(5)


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


def running(how):
    """Tell the host how Ctrl-C acts from now on (RUN, BOOT, MAIN or REPL; no allocation: the
    heap may be locked). MAIN and REPL wait for the host's answer: for MAIN, False means a
    Ctrl-C came during the power-on (or for main.py while it waits here) and main.py must not
    start; for REPL, an interrupt the host sent for the code that just ended is taken here, not
    inside the REPL."""
    if _ctl is None:
        return True
    state["reply"] = None
    ctl(how)
    while how is MAIN or how is REPL:
        try:
            while state["reply"] is None:
                time.sleep_ms(1)
            time.sleep_ms(1)  # a late KeyboardInterrupt surfaces here
            return state["reply"] != b"STOP"
        except KeyboardInterrupt:
            if how is MAIN:  # the host let main.py run, then a Ctrl-C came for it
                return False
    return True


def ctl(msg):
    """Send one control message (bytes) to the host; ignore a missing host."""
    if _ctl is None:
        return
    try:
        _ctl.write(msg)
    except OSError:
        pass
