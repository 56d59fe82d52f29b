"""CAN signal decoder: table from tools/dbc2table.py, viper hot path, values on read."""
import array
import struct
import micropython
from micropython import const

# Table layout: see tools/dbc2table.py (module docstring).  The table is read in place (a
# frozen bytes object stays in flash); only per-frame data is copied into three typed
# arrays the viper code indexes with ptr32/ptr16/ptr8 (aligned on every port):
#   _u32 (array 'I'): [0] last message index + 1, [1] batch read offset, [2..9] section
#                     offsets, [11] signals written by the last frame, [12..15] table
#                     offsets (_U_*); then frame ids | raw piece values | multiplexer
#                     ranges (lo, hi)
#   _u16 (array 'H'): 16 group ranges | per message (first sig, count, mux sig) |
#                     per signal (word, first piece, mux range) | touched list
#                     word = bytes needed | (pieces - 1) << 7 | muxed << 8 | is muxer << 9
#   _u8 (bytearray):  per piece (b0, sh0 | dir << 3, nbytes, nbits) | per signal "seen"
# Batch records (feed_batch): 4 bytes LE id | extended << 29 | bus << 30, 1 byte dlc,
# dlc data bytes; records follow each other without padding.

_HDR = "<4sBBHHHHHHHII"
_HDR_LEN = const(28)
_RNG_LEN = const(32)
_CONV_LEN = const(20)
_OM = const(_HDR_LEN + _RNG_LEN)   # table offset of the message records
_NONE = const(0xFFFF)
_U_SIG = const(12)      # _u32 slots holding table offsets: signal records,
_U_CONV = const(13)     # conversions,
_U_CHO = const(14)      # choices,
_U_STR = const(15)      # strings

SIGNED = const(0x100)
FLOAT = const(0x200)
CHOICES = const(0x400)
MUXER = const(0x800)
MUXED = const(0x1000)
INT = const(0x2000)
MINT = const(0x4000)
AUX = const(0x8000)
BIGENDIAN = const(0x10000)


@micropython.viper
def _run(u32, u16, u8, mod, tupd, tgt, buf, nfr: int, grp: int, cid: int, dl: int, now: int) -> int:
    # nfr == 0: one frame (grp, cid, dl, data = buf); nfr > 0: nfr records from buf.
    w = ptr32(u32)
    h = ptr16(u16)
    b = ptr8(u8)
    md = ptr8(mod)
    tu = ptr32(tupd)
    tg = ptr16(tgt)
    d = ptr8(buf)
    blen = int(len(buf))
    oid = int(w[2])
    oraw = int(w[3])
    omux = int(w[4])
    omi = int(w[5])
    osg = int(w[6])
    otch = int(w[7])
    oseen = int(w[8])
    total = 0
    pos = int(w[1])
    single = 0
    if nfr == 0:
        single = 1
        nfr = 1
        if dl > blen:
            dl = blen
    base = 0
    while nfr > 0:
        nfr -= 1
        if single == 0:
            if pos + 5 > blen:
                break
            b3 = int(d[pos + 3])
            cid = int(d[pos]) | (int(d[pos + 1]) << 8) | (int(d[pos + 2]) << 16) | ((b3 & 0x1F) << 24)
            grp = ((b3 >> 6) << 1) | ((b3 >> 5) & 1)
            dl = int(d[pos + 4])
            base = pos + 5
            pos = base + dl
            if pos > blen:
                break
        lo = int(h[grp << 1])
        hi = int(h[(grp << 1) + 1])
        mi = -1
        while lo < hi:
            mid = (lo + hi) >> 1
            v = int(w[oid + mid])
            if v < cid:
                lo = mid + 1
            elif v > cid:
                hi = mid
            else:
                mi = mid
                break
        w[0] = mi + 1
        w[11] = 0
        if mi < 0:
            continue
        q = omi + mi * 3
        k = int(h[q])
        kend = k + int(h[q + 1])
        muxok = 0
        muxv = 0
        cnt = 0
        while k < kend:
            s = osg + k * 3
            a = int(h[s])
            if (a & 0x7F) > dl:
                k += 1
                continue
            if a & 0x100:
                if muxok == 0:
                    k += 1
                    continue
                j = omux + (int(h[s + 2]) << 1)
                if muxv < int(w[j]) or muxv > int(w[j + 1]):
                    k += 1
                    continue
            p = int(h[s + 1])
            np = ((a >> 7) & 1) + 1
            ch = 0
            while np > 0:
                pb = p << 2
                i = base + int(b[pb])
                sh = int(b[pb + 1])
                st = 1 - ((sh >> 2) & 2)
                sh &= 7
                nb = int(b[pb + 2])
                v = int(d[i]) >> sh
                sh = 8 - sh
                while nb > 1:
                    i += st
                    v |= int(d[i]) << sh
                    sh += 8
                    nb -= 1
                v &= ((1 << (int(b[pb + 3]) - 1)) << 1) - 1
                if int(w[oraw + p]) != v:
                    w[oraw + p] = v
                    ch = 1
                p += 1
                np -= 1
            if a & 0x200:
                muxv = v
                muxok = 1
            if int(b[oseen + k]) == 0:
                b[oseen + k] = 1
                ch = 1
            m = int(tg[k])
            if m != 0xFFFF:
                tu[m] = now
                if ch:
                    md[m] = 0xFF
            h[otch + cnt] = k
            cnt += 1
            k += 1
        w[11] = cnt
        total += cnt
    w[1] = pos
    return total


class Decoder:
    """Decoder(table): table = bytes from dbc2table (may be a frozen bytes object)."""

    def __init__(self, table):
        t = table
        if len(t) < _HDR_LEN + _RNG_LEN:
            raise ValueError("not a decode table (short)")
        hd = struct.unpack_from(_HDR, t, 0)
        if hd[0] != b"OVDT" or hd[1] != 1:
            raise ValueError("not a decode table (magic/version)")
        # record formats (string offsets are 32-bit in wide tables)
        w = hd[2] & 1
        self._fm = fm = "<IHHHHI" if w else "<IHHHHH"
        self._fs = fs = "<HBBBBHHHHIIIHHI" if w else "<HBBBBHHHHHHHHHH"
        self._fc = "<qI" if w else "<qH"
        lm = struct.calcsize(fm)
        ls = struct.calcsize(fs)
        nmsg, nsig, npc, ncv, maxsig, nmux, nch = hd[3], hd[4], hd[5], hd[6], hd[7], hd[8], hd[10]
        osigs = _OM + nmsg * lm
        omx = osigs + nsig * ls
        op = omx + nmux * 8
        oc = op + npc * 4
        och = oc + ncv * _CONV_LEN
        ostr = och + nch * struct.calcsize(self._fc)
        if len(t) != ostr + hd[11] or maxsig < 1 or not hd[11] or t[-1] != 0:
            raise ValueError("corrupt decode table (length)")
        self._t = t
        self.nsignals = nsig
        self.nmessages = nmsg
        oid = 16
        oraw = oid + nmsg
        omux = oraw + npc
        u32 = array.array("I", bytes(4 * (omux + 2 * nmux)))
        omi = 16
        osg = omi + 3 * nmsg
        otch = osg + 3 * nsig
        u16 = array.array("H", bytes(2 * (otch + maxsig)))
        u8 = bytearray(4 * npc + nsig)
        for i, v in enumerate((oid, oraw, omux, omi, osg, otch, 4 * npc)):
            u32[2 + i] = v
        u32[_U_SIG] = osigs
        u32[_U_CONV] = oc
        u32[_U_CHO] = och
        u32[_U_STR] = ostr
        rng = struct.unpack_from("<16H", t, _HDR_LEN)
        for g in range(8):
            if not rng[2 * g] <= rng[2 * g + 1] <= nmsg:
                raise ValueError("corrupt decode table (ranges)")
            u16[2 * g] = rng[2 * g]
            u16[2 * g + 1] = rng[2 * g + 1]
        for i in range(nmsg):
            fid, first, n, mux, _, _ = struct.unpack_from(fm, t, _OM + i * lm)
            if first + n > nsig or (mux != _NONE and not first <= mux < first + n) or n > maxsig:
                raise ValueError("corrupt decode table (message %d)" % i)
            u32[oid + i] = fid
            u16[omi + 3 * i] = first
            u16[omi + 3 * i + 1] = n
            u16[omi + 3 * i + 2] = mux
        for i in range(nmux):
            lo, hi = struct.unpack_from("<II", t, omx + 8 * i)
            u32[omux + 2 * i] = lo
            u32[omux + 2 * i + 1] = hi
        for i in range(4 * npc):
            u8[i] = t[op + i]
        for i in range(npc):
            b0, sd, nb, bits = u8[4 * i], u8[4 * i + 1], u8[4 * i + 2], u8[4 * i + 3]
            end = b0 + (nb - 1 if sd < 8 else 1 - nb)
            if sd > 15 or nb < 1 or not 0 <= end < 64 or b0 >= 64 or not 1 <= bits <= 32:
                raise ValueError("corrupt decode table (piece %d)" % i)
        for k in range(nsig):
            p0, np, need, bits, _, fl, mx = struct.unpack_from("<HBBBBHH", t, osigs + k * ls)
            if p0 + np > npc or not 1 <= np <= 2 or need > 64 or bits > 64 or \
                    (fl & 0x10 and mx >= nmux):
                raise ValueError("corrupt decode table (signal %d)" % k)
            for p in range(p0, p0 + np):
                b0, nb, sd = u8[4 * p], u8[4 * p + 2], u8[4 * p + 1]
                if max(b0, b0 + (nb - 1 if sd < 8 else 1 - nb)) >= need:
                    raise ValueError("corrupt decode table (signal %d bytes)" % k)
            u16[osg + 3 * k] = need | ((np - 1) << 7) | ((fl & 0x10) << 4) | ((fl & 0x08) << 6)
            u16[osg + 3 * k + 1] = p0
            u16[osg + 3 * k + 2] = mx
        self._u32 = u32
        self._u16 = u16
        self._u8 = u8
        self._mod = bytearray(1)
        self._tupd = array.array("I", bytes(4))
        self._tgt = array.array("H", b"\xff\xff" * max(nsig, 1))     # no signal bound (_NONE)

    # ---------------------------------------------------------------- hot path
    def bind(self, mod, tupd, targets):
        """mod: bytearray per metric (0xFF on raw change); tupd: array('i') per metric (set to
        `now` on every write); targets: array('H') signal index -> metric index (0xFFFF none)."""
        n = self.nsignals
        if not isinstance(targets, array.array) or len(targets) < n \
                or len(bytes(targets)) != 2 * len(targets):
            raise ValueError("targets must be array('H') of >= %d entries" % n)
        if not isinstance(mod, bytearray) or not isinstance(tupd, array.array) \
                or len(bytes(tupd)) != 4 * len(tupd):
            raise ValueError("mod must be a bytearray, tupd an array('i')")
        for k in range(n):
            m = targets[k]
            if m != _NONE and not 0 <= m < min(len(mod), len(tupd)):
                raise ValueError("target %d of signal %d beyond metric table" % (m, k))
        self._mod = mod
        self._tupd = tupd
        self._tgt = targets

    def feed(self, bus, can_id, ext, data, dlc, now):
        """Decode one frame (data: buffer, dlc: received length).  Returns the number of
        signals written (0 for unknown ids); `touched` lists them."""
        if not 0 <= bus <= 3 or not 0 <= can_id < 0x20000000:
            self._u32[0] = 0
            self._u32[11] = 0
            return 0
        if dlc < 0:
            dlc = 0
        self._u32[1] = 0
        return _run(self._u32, self._u16, self._u8, self._mod, self._tupd, self._tgt, data, 0,
                    (bus << 1) | (1 if ext else 0), can_id, dlc, now)

    def feed_batch(self, buf, nframes, now, start=0):
        """Decode `nframes` records packed in `buf` from offset `start` (format: 4-byte LE
        id | ext << 29 | bus << 30, 1-byte dlc, dlc data bytes).  Returns the number of
        signals written; `pos` is the offset after the last record read."""
        if nframes <= 0 or not 0 <= start <= len(buf):
            self._u32[0] = 0
            self._u32[11] = 0
            return 0
        self._u32[1] = start
        return _run(self._u32, self._u16, self._u8, self._mod, self._tupd, self._tgt, buf,
                    nframes, 0, 0, 0, now)

    @property
    def pos(self):
        return self._u32[1]

    @property
    def message(self):
        """Index of the message matched by the last frame, -1 if none."""
        return self._u32[0] - 1

    @property
    def touched(self):
        """Signal indexes written by the last frame, in table order (a memoryview; valid
        until the next feed).  Allocation-free alternative: ntouched + touched_at(i)."""
        o = self._u32[7]
        return memoryview(self._u16)[o:o + self._u32[11]]

    @property
    def ntouched(self):
        return self._u32[11]

    def touched_at(self, i):
        return self._u16[self._u32[7] + i]

    # ---------------------------------------------------------------- reading
    def _sig(self, k):
        if not 0 <= k < self.nsignals:
            raise IndexError("signal index")
        fs = self._fs
        return struct.unpack_from(fs, self._t, self._u32[_U_SIG] + k * struct.calcsize(fs))

    def _str(self, off):
        t = self._t
        o = self._u32[_U_STR] + off
        e = o
        while t[e]:
            e += 1
        return str(t[o:e], "utf-8")

    def info(self, k):
        """(message name, signal name, metric name, unit, flags); flags = bit length |
        SIGNED | FLOAT | CHOICES | MUXER | MUXED | INT | MINT | AUX | BIGENDIAN."""
        s = self._sig(k)
        fm = self._fm
        mname = struct.unpack_from(fm, self._t, _OM + s[12] * struct.calcsize(fm))[5]
        return (self._str(mname), self._str(s[9]), self._str(s[10]), self._str(s[11]),
                s[3] | (s[5] << 8))

    def msg_info(self, i):
        """(bus, extended, frame id, name, length) of message i."""
        fm = self._fm
        fid, _, _, _, ln, nm = struct.unpack_from(fm, self._t, _OM + i * struct.calcsize(fm))
        rng = struct.unpack_from("<16H", self._t, _HDR_LEN)
        g = 0
        while not rng[2 * g] <= i < rng[2 * g + 1]:
            g += 1
        return (g >> 1, g & 1, fid, self._str(nm), ln)

    def raw(self, k):
        """Raw value of signal k: sign-extended int, or float for IEEE float signals."""
        s = self._sig(k)
        p, np, bits, fl = s[0], s[1], s[3], s[5]
        u = self._u32
        r = u[u[3] + p]             # (u[3]: offset of the raw piece values)
        if np == 2:
            r |= u[u[3] + p + 1] << 32
        if fl & 0x02:
            if bits == 32:
                return struct.unpack("<f", struct.pack("<I", r))[0]
            return struct.unpack("<d", struct.pack("<Q", r))[0]
        if fl & 0x01 and r >> (bits - 1):
            r -= 1 << bits
        return r

    def value(self, k, choices=True, convert=True):
        """Physical value of signal k: raw * scale + offset (int when scale and offset are
        integral, as cantools), the VAL_ label (str) when `choices` and the raw value has
        one; convert: apply the mapping's factor/add (False: the DBC value)."""
        s = self._sig(k)
        r = self.raw(k)
        if choices and s[13]:
            key = r
            if isinstance(r, float):
                key = int(r) if r - r == 0 else None
            if key is not None:
                t = self._t
                fc = self._fc
                lc = struct.calcsize(fc)
                for i in range(s[14], s[14] + s[13]):
                    v, so = struct.unpack_from(fc, t, self._u32[_U_CHO] + i * lc)
                    if v == key:
                        return self._str(so)
        c = s[8] if convert else s[7]
        sc, of, si, oi = struct.unpack_from("<ddBB", self._t, self._u32[_U_CONV] + c * _CONV_LEN)
        if si and oi and sc == 1 and of == 0:
            return r
        return r * (int(sc) if si else sc) + (int(of) if oi else of)
