"""NMEA 0183 parser: GGA, RMC, GSA, VTG, GSV from any talker, on bytes, no per-sentence heap."""
import array
from micropython import const

_MAX = const(82)        # NMEA 0183: at most 82 characters, "$" to "\n"

# fix fields (Parser.fix): see Parser.__init__
F_LAT = const(0)        # degrees (+N / -S)
F_LON = const(1)
F_ALT = const(2)        # metres above mean sea level (GGA)
F_SPEED = const(3)      # km/h
F_TRACK = const(4)      # degrees true
F_HDOP = const(5)


class Parser:
    """Feed bytes; complete sentences update the fix. Counters: good, bad (checksum, format,
    too long), other (valid sentences of other types)."""

    def __init__(self):
        self.buf = bytearray(_MAX + 2)
        self.n = -1             # -1: waiting for "$"
        self.f = array.array("H", bytes(2 * 24))    # field start offsets
        self.nf = 0
        self.fix = array.array("d", bytes(8 * 6))
        self.have = 0           # bit per F_* field that has a value
        self.sats = 0           # satellites used (GGA)
        self.quality = 0        # GGA fix quality (0 = none)
        self.mode = 1           # GSA / derived fix mode: 1 none, 2 2D, 3 3D
        self.status = 0         # RMC status: 1 valid (A), 0 void (V)
        self.faa = 78           # RMC/VTG mode indicator letter (N = no fix)
        self.tod = -1           # time of day of the last fix, seconds x 100
        self.date = -1          # ddmmyy of the last RMC
        self.visible = 0        # satellites in view (GSV)
        self.good = self.bad = self.other = 0
        self.fixes = 0          # RMC/GGA sentences that carried a position
        self._gsa = False       # a GSA has been seen (the mode comes from it then)
        self._gsa_tod = -1      # time of the cycle of the last GSA

    def feed(self, data, cb=None):
        """Bytes from the receiver; cb(kind) after each valid sentence (kind: b"GGA", ...
        as the sentence's last 3 letters, a memoryview into the line buffer)."""
        b = self.buf
        n = self.n
        for c in data:
            if c == 36:                 # "$": a new sentence (a partial one is bad)
                if n > 0:
                    self.bad += 1
                b[0] = c
                n = 1
            elif n < 0:
                continue
            elif c == 10 or c == 13:
                if n > 1:
                    self.n = -1
                    self._line(n, cb)
                n = -1
            elif n >= _MAX or c < 32 or c > 126:
                self.bad += 1           # too long, or binary noise inside a sentence
                n = -1
            else:
                b[n] = c
                n += 1
        self.n = n

    def _line(self, n, cb):
        b = self.buf
        if n < 9 or b[n - 3] != 42:     # "*hh"
            self.bad += 1
            return
        x = 0
        for i in range(1, n - 3):
            x ^= b[i]
        if x != _hex(b[n - 2]) << 4 | _hex(b[n - 1]):
            self.bad += 1
            return
        # fields: offsets of the characters after each comma, up to the "*"
        f = self.f
        k = 0
        for i in range(1, n - 3):
            if b[i] == 44 and k < 23:
                f[k] = i + 1
                k += 1
        f[k] = n - 2                    # sentinel: end of the last field is f[k] - 1
        self.nf = k
        if k < 1 or f[0] != 7:          # "$ttSSS,": talker (2) + type (3)
            if k and b[1] == 80:        # "$P...": a proprietary sentence, checksum good
                self.other += 1
            else:
                self.bad += 1
            return
        t0, t1, t2 = b[3], b[4], b[5]
        ok = True
        if t0 == 71 and t1 == 71 and t2 == 65:      # GGA
            ok = self._gga()
        elif t0 == 82 and t1 == 77 and t2 == 67:    # RMC
            ok = self._rmc()
        elif t0 == 71 and t1 == 83 and t2 == 65:    # GSA
            ok = self._gsa_()
        elif t0 == 86 and t1 == 84 and t2 == 71:    # VTG
            ok = self._vtg()
        elif t0 == 71 and t1 == 83 and t2 == 86:    # GSV
            if k >= 3:
                v = self._int(2)
                if v >= 0:
                    self.visible = v
        else:
            self.other += 1
            return
        if not ok:
            self.bad += 1
            return
        self.good += 1
        if cb:
            cb(memoryview(b)[3:6])

    # ---- fields ----------------------------------------------------------------------
    def _span(self, i):
        # field i (0 = first after the type) -> (start, end)
        if i >= self.nf:
            return 0, 0
        return self.f[i], self.f[i + 1] - 1

    def _int(self, i):
        s, e = self._span(i)
        if s >= e:
            return -1
        v = 0
        b = self.buf
        for j in range(s, e):
            c = b[j] - 48
            if not 0 <= c <= 9:
                return -2
            v = v * 10 + c
        return v

    def _dec(self, i):
        # (mantissa, decimals, sign) of a decimal number field; decimals -1: empty/bad
        s, e = self._span(i)
        if s >= e:
            return 0, -1, 1
        b = self.buf
        sg = 1
        if b[s] == 45:
            sg = -1
            s += 1
        m = 0
        d = -1
        for j in range(s, e):
            c = b[j]
            if c == 46 and d < 0:
                d = 0
            elif 48 <= c <= 57:
                m = m * 10 + c - 48
                if d >= 0:
                    d += 1
            else:
                return 0, -1, 1
        return m, (d if d >= 0 else 0), sg

    def _float(self, i):
        m, d, sg = self._dec(i)
        if d < 0:
            return None
        return sg * m / (10 ** d)

    def _coord(self, i, neg):
        # ddmm.mmmm (dddmm.mmmm) + hemisphere letter -> degrees
        m, d, sg = self._dec(i)
        if d < 0 or sg < 0:
            return None
        s, e = self._span(i + 1)
        if e != s + 1:
            return None
        h = self.buf[s]
        p = 10 ** d
        deg = m // (100 * p)
        minutes = m - deg * 100 * p
        if minutes >= 60 * p:
            return None
        v = deg + minutes / (60 * p)
        if h == neg:
            return -v
        return v

    def _time(self, i):
        m, d, sg = self._dec(i)
        if d < 0 or sg < 0:
            return -1
        # hhmmss[.ss] -> seconds x 100
        while d > 2:
            m //= 10
            d -= 1
        while d < 2:
            m *= 10
            d += 1
        hh = m // 1000000
        mm = m // 10000 % 100
        ss = m % 10000
        if hh > 23 or mm > 59 or ss >= 6100:
            return -1
        return (hh * 3600 + mm * 60) * 100 + ss

    def _setf(self, k, i, scale=1.0):
        # fix field k from number field i (an empty or bad field leaves k as it was)
        v = self._float(i)
        if v is not None:
            self._set(k, v * scale if scale != 1.0 else v)

    def _pos(self, i):
        # latitude at field i, longitude at i + 2 (with their hemispheres); False if bad
        lat, lon = self._coord(i, 83), self._coord(i + 2, 87)      # S, W: negative
        if lat is None or lon is None:
            return False
        self._set(F_LAT, lat)
        self._set(F_LON, lon)
        self.fixes += 1
        return True

    def _set(self, k, v):
        if v is None:
            self.have &= ~(1 << k)
        else:
            self.fix[k] = v
            self.have |= 1 << k

    # ---- sentences -------------------------------------------------------------------
    def _gga(self):
        if self.nf < 9:
            return False
        q = self._int(5)
        self.quality = q if q > 0 else 0
        t = self._time(0)
        if self.quality:
            if not self._pos(1):
                return False
            self._set(F_ALT, self._float(8))
            if t >= 0:
                self.tod = t
            if not self._gsa:
                self.mode = 3 if self.have & (1 << F_ALT) else 2
        elif not self._gsa:
            self.mode = 1
        s = self._int(6)
        if s >= 0:
            self.sats = s
        self._setf(F_HDOP, 7)
        return True

    def _rmc(self):
        if self.nf < 9:
            return False
        s, e = self._span(1)
        self.status = 1 if e == s + 1 and self.buf[s] == 65 else 0
        if self.nf > 11:
            s, e = self._span(11)
            if e > s:
                self.faa = self.buf[s]
        t = self._time(0)
        dt = self._int(8)
        if dt >= 0:
            self.date = dt
        if self.status:
            if not self._pos(2):
                return False
            if t >= 0:
                self.tod = t
            self._setf(F_SPEED, 6, 1.852)       # knots -> km/h
            self._setf(F_TRACK, 7)
        elif not self._gsa:
            self.mode = 1
        return True

    def _gsa_(self):
        if self.nf < 2:
            return False
        m = self._int(1)
        if 1 <= m <= 3:
            # one GSA per constellation in a cycle (GN talkers): the best of them counts
            if not self._gsa or self._gsa_tod != self.tod or m > self.mode:
                self.mode = m
            self._gsa = True
            self._gsa_tod = self.tod
        self._setf(F_HDOP, 15)
        return True

    def _vtg(self):
        if self.nf < 8:
            return False
        self._setf(F_TRACK, 0)
        self._setf(F_SPEED, 6)
        return True

    def unix_time(self):
        """Seconds since 1970 of the last fix (RMC date + time), or -1."""
        if self.date < 0 or self.tod < 0:
            return -1
        d = self.date
        day, mon, yy = d // 10000, d // 100 % 100, d % 100
        if not (1 <= day <= 31 and 1 <= mon <= 12):
            return -1
        y = 2000 + yy if yy < 80 else 1900 + yy
        # days from civil (proleptic Gregorian)
        yy2 = y - (1 if mon <= 2 else 0)
        era = yy2 // 400
        yoe = yy2 - era * 400
        doy = (153 * (mon + (-3 if mon > 2 else 9)) + 2) // 5 + day - 1
        doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
        days = era * 146097 + doe - 719468
        return days * 86400 + self.tod // 100


def _hex(c):
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return 256          # never matches a checksum byte
