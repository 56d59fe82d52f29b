"""ISO-TP (ISO 15765-2) tester side: one transfer at a time per bus, no heap allocation per frame."""
import time
from micropython import const

IDLE = const(0)
TX_FC = const(1)     # first frame sent, waiting for the ECU's flow control (N_Bs)
TX_CF = const(2)     # sending consecutive frames (ECU's block size and STmin)
RX_WAIT = const(3)   # request sent, waiting for the answer (P2, P2* after NRC 0x78)
RX_CF = const(4)     # receiving consecutive frames (N_Cr)
DONE = const(5)      # answer in buf[:n]
FAIL = const(6)      # err says why

E_TIMEOUT = const(1)
E_BS = const(2)
E_CR = const(3)
E_SEQ = const(4)
E_FORMAT = const(5)
E_TOOLONG = const(6)
E_OVFL = const(7)
E_SEND = const(8)
ERRORS = ("ok", "no answer", "no flow control", "consecutive frame lost", "wrong sequence number",
          "wrong length", "answer too long", "ECU refused (overflow)", "send failed")

_PENDING_MAX = const(10)
_WFT_MAX = const(10)        # flow control "wait" frames accepted per request (N_WFTmax)    # NRC 0x78 accepted per request (10 x P2* = 50 s at most)


def _st_ms(b):
    # STmin byte -> milliseconds to wait between consecutive frames (100-900 us: 1 ms)
    if b <= 0x7F:
        return b
    if 0xF1 <= b <= 0xF9:
        return 1
    return 0x7F


class Channel:
    """One ISO-TP connection on a bus. send(fid, data, ext) -> bool transmits one frame.

    start() a request; feed() every received frame (True if it was ours); poll() often (sends
    consecutive frames, runs the timers) until state is DONE (answer in buf[:n]) or FAIL (err).
    Functional requests (0x7DF, or 29-bit 0x18DB33F1) take the first ECU that answers.
    size: longest answer accepted (<= 4095); longer ones are refused (flow control overflow)."""

    def __init__(self, send, size=4095, bs=0, stmin=0, pad=0xAA, p2=1000, p2star=5000,
                 ncr=1000, nbs=1000, reqmax=64):
        self.send = send
        self.size = min(max(size, 8), 4095)
        self.buf = bytearray(self.size)
        self.req = bytearray(reqmax)
        f = self._f = bytearray(8)
        mv = memoryview(f)
        self._mv = tuple(mv[:k] for k in range(9))  # frames of each length, made once
        self.bs, self.stmin, self.pad = bs, stmin, pad
        self.p2, self.p2star, self.ncr, self.nbs = p2, p2star, ncr, nbs
        self.state = IDLE
        self.err = 0
        self.n = 0          # bytes received (or, sending, bytes of the request sent)
        self.total = 0      # bytes expected (or, sending, request length)
        self.pending = 0    # NRC 0x78 seen for this request
        self.txid = self.rxid = self.rxmask = self.fcid = 0
        self.ext = False
        self._seq = self._bc = self._ebs = self._est = self._wft = 0
        self._t = 0
        self.errors = 0     # transfers failed since start
        self.too_long = 0   # answers refused as longer than size

    def busy(self):
        return 0 < self.state < DONE

    def _tx(self, fid, k):
        # frame of k meaningful bytes in _f, padded to 8 unless pad < 0
        f = self._f
        if self.pad >= 0:
            while k < 8:
                f[k] = self.pad
                k += 1
        try:
            return self.send(fid, self._mv[k], self.ext)
        except Exception:
            return False

    def _fail(self, e):
        self.state = FAIL
        self.err = e
        self.errors += 1
        if e == E_TOOLONG:
            self.too_long += 1

    def start(self, txid, rxid, ext, req):
        """Send request bytes req to txid; the answer comes from rxid (0: functional, any ECU)."""
        n = len(req)
        if not 0 < n <= len(self.req):
            raise ValueError("request length")
        r = self.req
        for i in range(n):
            r[i] = req[i]
        self.txid, self.ext = txid, bool(ext)
        if rxid:
            self.rxid, self.rxmask, self.fcid = rxid, 0x1FFFFFFF, txid
        elif ext:
            self.rxid, self.rxmask = (0x18DAF100, 0x1FFFFF00)
        else:
            self.rxid, self.rxmask = (0x7E8, 0x7F8)
        self.total, self.pending, self.err, self._wft = n, 0, 0, 0
        f = self._f
        now = time.ticks_ms()
        if n <= 7:
            f[0] = n
            for i in range(n):
                f[1 + i] = r[i]
            self.state = RX_WAIT
            self._t = time.ticks_add(now, self.p2)
            if not self._tx(txid, n + 1):
                self._fail(E_SEND)
            return
        f[0] = 0x10 | n >> 8
        f[1] = n & 0xFF
        for i in range(6):
            f[2 + i] = r[i]
        self.n = 6
        self._seq = 1
        self.state = TX_FC
        self._t = time.ticks_add(now, self.nbs)
        if not self._tx(txid, 8):
            self._fail(E_SEND)

    def _fc(self, fs):
        f = self._f
        f[0] = 0x30 | fs
        f[1] = self.bs
        f[2] = self.stmin
        return self._tx(self.fcid, 3)

    def _complete(self, n):
        b = self.buf
        self.n = n
        if n >= 3 and b[0] == 0x7F and b[2] == 0x78 and b[1] == self.req[0]:
            self.pending += 1       # response pending: wait longer for the real answer
            if self.pending > _PENDING_MAX:
                self._fail(E_TIMEOUT)
                return
            self.state = RX_WAIT
            self._t = time.ticks_add(time.ticks_ms(), self.p2star)
            return
        self.state = DONE

    def feed(self, fid, ext, d):
        """One received frame (d: its data); True if it belongs to the transfer in progress."""
        st = self.state
        if st == IDLE or st >= DONE or (fid & self.rxmask) != self.rxid or bool(ext) != self.ext:
            return False
        dl = len(d)
        if dl < 1:
            return True
        pci = d[0] >> 4
        if st == TX_FC or st == TX_CF:
            if pci == 3:
                if dl < 3:
                    self._fail(E_FORMAT)
                    return True
                fs = d[0] & 15
                if fs == 0:
                    self._ebs = d[1]
                    self._est = _st_ms(d[2])
                    self._bc = 0
                    self.state = TX_CF
                    self._t = time.ticks_ms()
                elif fs == 1:           # wait: at most _WFT_MAX times per request
                    self._wft += 1
                    if self._wft > _WFT_MAX:
                        self._fail(E_BS)
                    else:
                        self._t = time.ticks_add(time.ticks_ms(), self.nbs)
                elif fs == 2:
                    self._fail(E_OVFL)
                else:
                    self._fail(E_FORMAT)
            return True
        b = self.buf
        if pci == 0:                    # single frame (also ends a reception cut short)
            n = d[0] & 15
            if n == 0 or n > dl - 1:
                self._fail(E_FORMAT)
                return True
            if n > self.size:
                self._fail(E_TOOLONG)
                return True
            for i in range(n):
                b[i] = d[1 + i]
            self._lock(fid)
            self._complete(n)
        elif pci == 1:                  # first frame
            if dl < 8:
                self._fail(E_FORMAT)
                return True
            self._lock(fid)
            total = (d[0] & 15) << 8 | d[1]
            if total == 0 or total > self.size:     # 0: more than 4095 bytes follow
                self._fc(2)
                self._fail(E_TOOLONG)
                return True
            if total < 8:
                self._fail(E_FORMAT)
                return True
            for i in range(6):
                b[i] = d[2 + i]
            self.total, self.n, self._seq, self._bc = total, 6, 1, 0
            self.state = RX_CF
            self._t = time.ticks_add(time.ticks_ms(), self.ncr)
            if not self._fc(0):
                self._fail(E_SEND)
        elif pci == 2:                  # consecutive frame
            if st != RX_CF:
                return True             # not expected: ignored
            if d[0] & 15 != self._seq:
                self._fail(E_SEQ)
                return True
            n = self.n
            k = self.total - n
            if k > 7:
                k = 7
            if dl - 1 < k:
                self._fail(E_FORMAT)
                return True
            for i in range(k):
                b[n + i] = d[1 + i]
            n += k
            self.n = n
            self._seq = (self._seq + 1) & 15
            if n >= self.total:
                self._complete(n)
                return True
            self._t = time.ticks_add(time.ticks_ms(), self.ncr)
            if self.bs:
                self._bc += 1
                if self._bc >= self.bs:
                    self._bc = 0
                    if not self._fc(0):
                        self._fail(E_SEND)
        return True

    def _lock(self, fid):
        # a functional request: the first ECU that answers is the one we talk to
        if self.rxmask != 0x1FFFFFFF:
            self.rxid, self.rxmask = fid, 0x1FFFFFFF
            if self.ext:
                self.fcid = (fid & 0x1FFF0000) | (fid & 0xFF) << 8 | (fid >> 8 & 0xFF)
            else:
                self.fcid = fid - 8

    def poll(self):
        """Timers and consecutive frames of a long request; returns the state."""
        st = self.state
        if st == IDLE or st >= DONE:
            return st
        now = time.ticks_ms()
        if time.ticks_diff(now, self._t) < 0:
            return st
        if st == TX_CF:
            f, r, n = self._f, self.req, self.n
            k = self.total - n
            if k > 7:
                k = 7
            f[0] = 0x20 | self._seq
            for i in range(k):
                f[1 + i] = r[n + i]
            if not self._tx(self.txid, k + 1):
                self._fail(E_SEND)
                return FAIL
            self.n = n + k
            self._seq = (self._seq + 1) & 15
            if self.n >= self.total:
                self.state = RX_WAIT
                self.n = 0
                self._t = time.ticks_add(now, self.p2)
            elif self._ebs:
                self._bc += 1
                if self._bc >= self._ebs:
                    self.state = TX_FC
                    self._t = time.ticks_add(now, self.nbs)
                else:
                    self._t = time.ticks_add(now, self._est)
            else:
                self._t = time.ticks_add(now, self._est)
            return self.state
        self._fail(E_BS if st == TX_FC else E_CR if st == RX_CF else E_TIMEOUT)
        return FAIL

    def reset(self):
        self.state = IDLE
