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


def _talk(addr, lines, expect_count, timeout=3.0, until=None):
    s = socket.create_connection(addr)
    s.settimeout(timeout)
    got = b""
    try:
        got += s.recv(100)
        for ln in lines:
            s.sendall(ln)
        end = time.time() + timeout
        while (got.count(b">") < expect_count or (until and until not in got)) and time.time() < end:
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
                        b"< " + b"x" * 400, b"\xff\xfe < echo >"], 13, timeout=10,
                    until=b"< echo >")   # how many errors the garbage makes depends on how TCP splits it
        assert out.startswith("< hi >")
        assert out.count("< error") >= 9, out
        assert "< ok >" in out and "< echo >" in out
        # the server is still up
        with d.can_bus("can1") as bus:
            bus.send(can.Message(arbitration_id=0x7DF, data=b"\x02\x01\x00", is_extended_id=False))


def test_replayed_frames_reach_clients_and_client_frames_merge(tmp_path):
    log = tmp_path / "drive.log"
    log.write_text("".join("(%.3f) can0 %03X#%02X\n" % (i * 0.01, 0x100 + i % 3, i & 0xFF)
                           for i in range(300)) + "(3.000) can1 18FF0001#0102\n")
    with VDev(tmp_path / "dev", can_log=log) as d:
        with d.can_bus("can0") as bus, d.can_bus("can1") as bus1:
            seen = set()
            end = time.time() + 10
            while len(seen) < 3 and time.time() < end:
                m = bus.recv(0.5)
                if m is not None:
                    seen.add(m.arbitration_id)
            assert seen == {0x100, 0x101, 0x102}
            m = _recv(bus1, 0x18FF0001)
            assert m.is_extended_id and bytes(m.data) == b"\x01\x02"
            # the firmware receives replayed and client frames through the one RX ring
            import subprocess
            from util import tool
            p = subprocess.Popen([tool("mpremote"), "connect", d.pty, "exec", COUNT],
                                 stdout=subprocess.PIPE, text=True)
            time.sleep(1.5)
            for _ in range(20):
                bus.send(can.Message(arbitration_id=0x555, data=b"\x55", is_extended_id=False))
                time.sleep(0.02)
            out, _ = p.communicate(timeout=60)
            ids = eval(out.split("IDS", 1)[1].strip())
            assert {0x555, 0x100, 0x101, 0x102} <= ids, out


COUNT = """
import machine, time
c = machine.CAN(1, 500000, mode=machine.CAN.MODE_SILENT)
c.set_filters(None)
ids = set()
end = time.ticks_add(time.ticks_ms(), 3000)
while time.ticks_diff(end, time.ticks_ms()) > 0:
    r = c.recv()
    if r:
        ids.add(r[0])
    else:
        time.sleep_ms(1)
print("IDS", ids)
"""
