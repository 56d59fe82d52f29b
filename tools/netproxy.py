"""Loopback TCP proxy for tests and benchmarks: blackhole, drop or refuse a link on demand."""
import socket
import threading


def listener():
    """A listening loopback TCP socket on a free port: (socket, port)."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls, ls.getsockname()[1]


def serve(owner, handle):
    """Start a thread accepting on owner.ls while owner.alive; handle(conn) for each."""
    def loop():
        while owner.alive:
            try:
                c, _ = owner.ls.accept()
            except OSError:
                return
            handle(c)
    threading.Thread(target=loop, daemon=True).start()


class Proxy:
    """Loopback TCP proxy to 127.0.0.1:target. blackhole(True): keep every connection open
    but forward nothing (both directions), like a dead cellular link. drop(): reset all."""

    def __init__(self, target):
        self.target = target
        self.ls, self.port = listener()
        self.hole = False
        self.hole_c2s = False      # drop only what the client sends
        self.refuse = False
        self.conns = []
        self.accepted = 0
        self.c2s = 0
        self.s2c = 0
        self.lock = threading.Lock()
        self.alive = True
        serve(self, self._accept)

    def _accept(self, c):
        if self.refuse:
            c.close()
            return
        try:
            s = socket.create_connection(("127.0.0.1", self.target), 2)
            s.settimeout(None)
        except OSError:
            c.close()
            return
        with self.lock:
            self.accepted += 1
            self.conns.append((c, s))
        threading.Thread(target=self._pump, args=(c, s, "c2s"), daemon=True).start()
        threading.Thread(target=self._pump, args=(s, c, "s2c"), daemon=True).start()

    def _pump(self, a, b, d):
        try:
            while True:
                x = a.recv(65536)
                if not x:
                    break
                if self.hole or (self.hole_c2s and d == "c2s"):
                    continue
                b.sendall(x)
                with self.lock:
                    setattr(self, d, getattr(self, d) + len(x))
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def blackhole(self, on=True):
        self.hole = on

    def drop(self):
        with self.lock:
            cs = self.conns
            self.conns = []
        for c, s in cs:
            for x in (c, s):
                # shutdown wakes the pump thread blocked in recv() (close alone would not,
                # and the kernel would keep the connection open while it waits)
                try:
                    x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    x.close()
                except OSError:
                    pass

    def close(self):
        self.alive = False
        self.ls.close()
        self.drop()
