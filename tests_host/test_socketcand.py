"""The virtual device's socketcand server: python-can joins its CAN bus, both directions; bad input."""
import socket
import time

import pytest

from util import VDev

can = pytest.importorskip("can")

# Stops the app (Ctrl-C), opens CAN(1) in normal mode, echoes each received frame back with id+1
ECHO = """
import machine, time
c = machine.CAN(1, 500000, mode=machine.CAN.MODE_NORMAL)
c.set_filters(None)
c.send(0x123, b"\\x01\\x02\\x03")
c.send(0x18DAF110, b"\\xAA", c.FLAG_EXT_ID)
end = time.ticks_add(time.ticks_ms(), 4000)
n = 0
while n < 2 and time.ticks_diff(end, time.ticks_ms()) > 0:
    r = c.recv()
    if r:
        c.send(r[0] + 1, bytes(r[1]), r[2])
        n += 1
    time.sleep_ms(5)
print("echoed", n)
"""


def _recv(bus, want, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        m = bus.recv(0.2)
        if m is not None and m.arbitration_id == want:
            return m
    raise AssertionError("frame %x not seen" % want)


def test_python_can_sees_and_sends(tmp_path):
    with VDev(tmp_path / "dev") as d:
        with d.can_bus("can0") as bus, d.can_bus("can0") as watcher:
            d.mpremote("exec", "import time; time.sleep_ms(100)")      # app stopped, REPL ready
            import subprocess
            import sys
            from util import tool
            p = subprocess.Popen([tool("mpremote"), "connect", d.pty, "resume", "exec", ECHO],
                                 stdout=subprocess.PIPE, text=True)
            m = _recv(bus, 0x123)
            assert bytes(m.data) == b"\x01\x02\x03" and not m.is_extended_id
            m = _recv(bus, 0x18DAF110)
            assert m.is_extended_id and bytes(m.data) == b"\xaa"
            bus.send(can.Message(arbitration_id=0x200, data=b"\x11\x22", is_extended_id=False))
            bus.send(can.Message(arbitration_id=0x1ABCDE0, data=b"", is_extended_id=True))
            m = _recv(bus, 0x201)
            assert bytes(m.data) == b"\x11\x22"
            assert _recv(bus, 0x1ABCDE1).is_extended_id
            # another client sees both the client's frame and the firmware's answer
            assert bytes(_recv(watcher, 0x200).data) == b"\x11\x22"
            _recv(watcher, 0x201)
            out, _ = p.communicate(timeout=30)
            assert "echoed 2" in out, out
        sys.stdout.flush()


def _talk(addr, lines, expect_count, timeout=3.0):
    s = socket.create_connection(addr)
    s.settimeout(timeout)
    got = b""
    try:
        got += s.recv(100)
        for ln in lines:
            s.sendall(ln)
        end = time.time() + timeout
        while got.count(b">") < expect_count and time.time() < end:
            try:
                got += s.recv(4096)
            except socket.timeout:
                break
    finally:
        s.close()
    return got.decode()


def test_bad_client_input_gets_errors(tmp_path):
    with VDev(tmp_path / "dev") as d:
        a = d.socketcand
        out = _talk(a, [b"< open can7 >", b"< send 123 1 00 >", b"< open can1 >",
                        b"< send 1234567890 1 00 >", b"< send 123 9 00 >", b"< send 123 2 00 >",
                        b"< send 123 1 zz >", b"garbage", b"< bogus >", b"<>",
                        b"< " + b"x" * 400, b"\xff\xfe < echo >"], 13)
        assert out.startswith("< hi >")
        assert out.count("< error") >= 9, out
        assert "< ok >" in out and "< echo >" in out
        # the server is still up
        with d.can_bus("can1") as bus:
            bus.send(can.Message(arbitration_id=0x7DF, data=b"\x02\x01\x00", is_extended_id=False))
