"""socketcand server for the virtual device's CAN bus (the text protocol python-can's client speaks).

Loopback only. A client says `< open can0 >` then `< rawmode >` and from then on receives every
frame on that interface (`< frame ID SECONDS.USECS DATA >`: what the firmware sends, what the log
replay feeds it, what other clients send) and may send `< send ID LEN B0 B1 .. >`, which reaches
the firmware through the same RX ring as the replay. Bad input gets `< error TEXT >`, never a crash.
"""
import queue
import re
import socket
import threading
import time

CHANNELS = {"can0": 1, "can1": 2}      # interface name -> controller (CAN(1), CAN(2))
_QUEUE = 4096                           # frames buffered per client; a slower client loses frames
_MAX_MSG = 256                          # longest element accepted (a frame is under 60 characters)
_HEX_ID = re.compile(r"^[0-9A-Fa-f]{1,8}$")
_HEX_BYTE = re.compile(r"^[0-9A-Fa-f]{1,2}$")
_PAUSE = object()                      # in a client's queue: the writer waits _PAUSE_S
_PAUSE_S = 0.25                         # after the rawmode answer: python-can reads it with one
                                        # recv() that must not hold frames too


def parse_send(words):
    """`send ID LEN B0 ..` words -> (id, ext, data); raises ValueError with the reason."""
    if len(words) < 3:
        raise ValueError("send needs an id and a length")
    ident, length = words[1], words[2]
    if not _HEX_ID.match(ident):
        raise ValueError("bad id %s" % ident[:16])
    fid = int(ident, 16)
    ext = len(ident) > 3 or fid > 0x7FF
    if fid > (0x1FFFFFFF if ext else 0x7FF):
        raise ValueError("id out of range %s" % ident)
    if not re.match(r"^[0-9A-Fa-f]$", length):
        raise ValueError("bad length %s" % length[:16])
    n = int(length, 16)
    body = words[3:]
    if n > 8 or len(body) != n:
        raise ValueError("length %d does not match %d data bytes" % (n, len(body)))
    for b in body:
        if not _HEX_BYTE.match(b):
            raise ValueError("bad data byte %s" % b[:16])
    return fid, ext, bytes(int(b, 16) for b in body)


class Client:
    def __init__(self, server, conn):
        self.server, self.conn = server, conn
        self.ctrl = None          # controller once opened
        self.raw = False          # receives frames (rawmode)
        self.q = queue.Queue(_QUEUE)
        self.lost = 0
        self.alive = True

    def put(self, line):
        try:
            self.q.put_nowait(line)
        except queue.Full:
            self.lost += 1

    def writer(self):
        while self.alive:
            line = self.q.get()
            if line is None:
                return
            if line is _PAUSE:
                time.sleep(_PAUSE_S)
                continue
            try:
                self.conn.sendall(line)
            except OSError:
                self.alive = False
                return

    def reader(self):
        buf = b""
        try:
            while self.alive:
                data = self.conn.recv(4096)
                if not data:
                    break
                buf += data
                while buf:
                    start = buf.find(b"<")
                    if start < 0:
                        if buf.strip():
                            self.put(b"< error text outside an element >")
                        buf = b""
                        break
                    if buf[:start].strip():
                        self.put(b"< error text outside an element >")
                    end = buf.find(b">", start)
                    if end < 0:
                        buf = buf[start:]
                        if len(buf) > _MAX_MSG:
                            self.put(b"< error element too long >")
                            buf = b""
                        break
                    nxt = buf.find(b"<", start + 1, end)
                    if nxt > 0:          # an element left open: drop it, go on at the next
                        self.put(b"< error unterminated element >")
                        buf = buf[nxt:]
                        continue
                    if end - start > _MAX_MSG:
                        self.put(b"< error element too long >")
                    else:
                        self.handle(buf[start + 1:end])
                    buf = buf[end + 1:]
        except OSError:
            pass
        finally:
            self.alive = False
            self.q.put(None)
            self.server.drop(self)
            try:
                self.conn.close()
            except OSError:
                pass

    def handle(self, body):
        try:
            words = body.decode("ascii").split()
        except UnicodeDecodeError:
            self.put(b"< error not ascii >")
            return
        if not words:
            self.put(b"< error empty element >")
            return
        cmd = words[0]
        if cmd == "open":
            if len(words) != 2 or words[1] not in CHANNELS:
                self.put(b"< error unknown interface (can0, can1) >")
            elif self.ctrl is not None:
                self.put(b"< error interface already open >")
            else:
                self.ctrl = CHANNELS[words[1]]
                self.put(b"< ok >")
        elif cmd == "rawmode":
            if self.ctrl is None:
                self.put(b"< error open an interface first >")
            else:
                self.put(b"< ok >")     # first: a frame must not overtake the answer
                self.put(_PAUSE)        # nor share its read (frames queue meanwhile)
                self.raw = True
        elif cmd == "echo":
            self.put(b"< echo >")
        elif cmd == "send":
            if self.ctrl is None:
                self.put(b"< error open an interface first >")
                return
            try:
                fid, ext, data = parse_send(words)
            except ValueError as e:
                self.put(("< error %s >" % e).encode("ascii", "replace"))
                return
            self.server.from_client(self, fid, ext, data)
        elif cmd in ("bcmmode", "isotpmode", "controlmode", "add", "update", "delete",
                     "subscribe", "unsubscribe", "filter", "statistics"):
            self.put(("< error %s not supported (rawmode only) >" % cmd).encode())
        else:
            self.put(("< error unknown command %s >" % cmd[:32]).encode("ascii", "replace"))


class Server:
    """Serves the bus on 127.0.0.1:port. inject(ctrl, fid, ext, data) delivers a client's frame
    to the firmware; frame(ctrl, fid, ext, data) is called for every frame on the bus."""

    def __init__(self, inject, port=0):
        self.inject = inject
        self.clients = []
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]

    def serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Client(self, conn)
            with self.lock:
                self.clients.append(c)
            c.put(b"< hi >")
            threading.Thread(target=c.writer, daemon=True).start()
            threading.Thread(target=c.reader, daemon=True).start()

    def drop(self, c):
        with self.lock:
            if c in self.clients:
                self.clients.remove(c)

    def active(self):
        return bool(self.clients)

    def frame(self, ctrl, fid, ext, data, exclude=None, t=None):
        if not self.clients:
            return
        line = ("< frame %s %.6f %s >" % (("%08X" if ext else "%03X") % fid,
                                          time.time() if t is None else t, data.hex().upper())).encode()
        with self.lock:
            targets = [c for c in self.clients if c.raw and c.ctrl == ctrl and c is not exclude]
        for c in targets:
            c.put(line)

    def from_client(self, c, fid, ext, data):
        self.frame(c.ctrl, fid, ext, data, exclude=c)
        self.inject(c.ctrl, fid, ext, data)
