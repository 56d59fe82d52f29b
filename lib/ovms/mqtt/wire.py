"""MQTT 3.1.1 wire format: packet encoders and the receive-path parser (client mixin)."""
import asyncio
from time import ticks_ms
from micropython import const

_REL = const(2)
_DONE = const(3)
_PID = const(0)
_QOS = const(1)
_ST = const(2)
_T = const(6)
_TRY = const(7)
_MAX_RX2 = const(32)   # QoS 2 packet ids received but not yet released

CONNACK_ERRORS = {1: "unacceptable protocol version", 2: "client identifier rejected",
                  3: "server unavailable", 4: "bad user name or password",
                  5: "not authorized"}


class MQTTException(Exception):
    """Protocol-level failure (CONNACK refusal, subscription refused, bad broker data)."""


def _b(s):
    return s.encode() if isinstance(s, str) else s


def _u16(n):
    return bytes((n >> 8, n & 0xFF))


def _str(s):
    return _u16(len(s)) + s


def _hdr(b0, n):
    h = bytearray(5)
    h[0] = b0
    i = 1
    while True:
        x = n & 0x7F
        n >>= 7
        h[i] = x | (0x80 if n else 0)
        i += 1
        if not n:
            return h[:i]


def _reason(e):
    a = e.args
    if not a:
        return type(e).__name__
    if len(a) > 1 and isinstance(a[-1], str):
        return a[-1].strip()
    if isinstance(a[0], int) and len(a) == 1:
        return "%s %d" % (type(e).__name__, a[0])
    return str(a[0]).strip()


class Receiver:
    """Receive path of MQTTClient: reads into the preallocated rx buffer, validates every
    packet (malformed -> MQTTException -> the link is closed with the reason). A PUBLISH
    larger than the buffer is skipped in place: acknowledged, counted, its bytes dropped as
    they arrive; any other oversized packet closes the link."""

    async def _reader(self, r, gen):
        mv = self._rxmv
        n = 0
        self._skip = 0
        try:
            while True:
                k = await r.readinto(mv[n:])
                if k is None:
                    continue
                if not k:
                    self._dead("disconnected" if self._stop else "connection closed by the broker")
                    return
                n += k
                self.rx_bytes += k
                self._last_rx = ticks_ms()
                d = self._skip
                if d:      # the rest of a skipped oversized PUBLISH: dropped unbuffered
                    if d > n:
                        d = n
                    self._skip -= d
                    if d < n:
                        mv[0:n - d] = mv[d:n]
                    n -= d
                off = 0
                while off < n:
                    used = await self._packet(mv, off, n)
                    if gen != self._gen:
                        return
                    if not used:
                        break
                    off += used
                if off:
                    if off < n:
                        mv[0:n - off] = mv[off:n]
                    n -= off
        except asyncio.CancelledError:
            raise
        except MQTTException as e:
            self._dead(_reason(e))
        except Exception as e:
            self._dead("receive failed: %s" % _reason(e))

    async def _packet(self, mv, off, n):
        # -> bytes used (0 = incomplete); MQTTException if malformed or oversized
        i = off + 1
        rl = 0
        sh = 0
        while True:
            if i >= n:
                return 0
            x = mv[i]
            i += 1
            rl |= (x & 0x7F) << sh
            if not x & 0x80:
                break
            sh += 7
            if sh > 21:
                raise MQTTException("malformed packet: remaining length over 4 bytes")
        total = i - off + rl
        if total > self._rxsize:
            if mv[off] & 0xF0 != 0x30:
                raise MQTTException("oversized packet from broker: %d bytes (max %d)"
                                    % (total, self._rxsize))
            return await self._oversized(mv, off, i, n, total)
        if n - off < total:
            return 0
        await self._handle(mv[off], mv, i, i + rl)
        return total

    async def _oversized(self, mv, off, a, n, total):
        # PUBLISH larger than the rx buffer: check and acknowledge its header (topic, packet
        # id) once it is in the buffer, then drop the rest as it arrives (self._skip)
        b0 = mv[off]
        qos = (b0 >> 1) & 3
        if qos == 3:
            raise MQTTException("malformed PUBLISH: QoS 3")
        if n - a < 2:
            return 0
        tl = mv[a] << 8 | mv[a + 1]
        p = a + 2 + tl + (2 if qos else 0)
        if not tl or p - off > total:
            raise MQTTException("malformed PUBLISH: bad topic length %d" % tl)
        if p - off > self._rxsize:
            raise MQTTException("oversized PUBLISH topic: %d bytes" % tl)
        if n < p:
            return 0
        topic = bytes(mv[a + 2:a + 2 + tl])
        for c in topic:
            if c == 0x2B or c == 0x23 or not c:
                raise MQTTException("malformed PUBLISH: wildcard in topic")
        pid = mv[p - 2] << 8 | mv[p - 1] if qos else 0
        if qos and not pid:
            raise MQTTException("malformed PUBLISH: packet id 0")
        self._skip = total - (n - off)
        new = True
        if qos == 2:
            if pid in self._rx2:
                new = False
            elif len(self._rx2) >= _MAX_RX2:
                raise MQTTException("broker left too many QoS 2 messages unreleased")
            else:
                self._rx2.add(pid)
        if new:
            self.skipped += 1
            self.log("skipped oversized message on %r: %d bytes (max %d)"
                     % (topic, total, self._rxsize))
            if self.on_big is not None:
                try:
                    self.on_big(topic, total, bool(b0 & 1))
                except Exception as ex:
                    self.log("on_big failed: %s" % _reason(ex))
        if qos:
            await self._out(bytes((0x40 if qos == 1 else 0x50, 2, pid >> 8, pid & 0xFF)))
        return n - off

    async def _handle(self, b0, mv, a, e):
        t = b0 & 0xF0
        rl = e - a
        if t == 0x30:
            qos = (b0 >> 1) & 3
            if qos == 3:
                raise MQTTException("malformed PUBLISH: QoS 3")
            if rl < 2:
                raise MQTTException("malformed PUBLISH: too short")
            tl = mv[a] << 8 | mv[a + 1]
            p = a + 2 + tl
            if not tl or p > e:
                raise MQTTException("malformed PUBLISH: bad topic length %d" % tl)
            pid = 0
            if qos:
                if p + 2 > e:
                    raise MQTTException("malformed PUBLISH: no packet id")
                pid = mv[p] << 8 | mv[p + 1]
                p += 2
                if not pid:
                    raise MQTTException("malformed PUBLISH: packet id 0")
            topic = bytes(mv[a + 2:a + 2 + tl])
            for c in topic:
                if c == 0x2B or c == 0x23 or not c:  # '+', '#', NUL are not allowed
                    raise MQTTException("malformed PUBLISH: wildcard in topic")
            deliver = True
            if qos == 2:
                if pid in self._rx2:
                    deliver = False
                    self.duplicates += 1
                else:
                    if len(self._rx2) >= _MAX_RX2:
                        raise MQTTException("broker left too many QoS 2 messages unreleased")
                    self._rx2.add(pid)
            if deliver and self.cb is not None:
                try:
                    self.cb(topic, bytes(mv[p:e]), bool(b0 & 1), qos, bool(b0 & 8))
                except Exception as ex:
                    self.log("callback failed: %s" % _reason(ex))
            if qos == 1:
                await self._out(bytes((0x40, 2, pid >> 8, pid & 0xFF)))
            elif qos == 2:
                await self._out(bytes((0x50, 2, pid >> 8, pid & 0xFF)))
            return
        if t in (0x40, 0x50, 0x70, 0x60, 0xB0):
            if rl != 2 or b0 != (0x62 if t == 0x60 else t):
                raise MQTTException("malformed packet type 0x%02x length %d" % (b0, rl))
            pid = mv[a] << 8 | mv[a + 1]
            if t == 0x60:  # PUBREL: QoS 2 message released
                self._rx2.discard(pid)
                await self._out(bytes((0x70, 2, pid >> 8, pid & 0xFF)))
                return
            if t == 0xB0:
                slot = self._subs.get(pid)
                if slot:
                    slot[1] = 0
                    slot[0].set()
                return
            ent = None
            for x in self._inflight:
                if x[_PID] == pid:
                    ent = x
                    break
            if t == 0x50:  # PUBREC
                if ent is not None and ent[_QOS] != 2:
                    raise MQTTException("PUBREC for a QoS %d message" % ent[_QOS])
                if ent is not None:
                    ent[_ST] = _REL
                    ent[_T] = ticks_ms()
                    ent[_TRY] = 0
                await self._out(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
                return
            if ent is None:
                return  # late ack for a message from an earlier connection
            if (t == 0x40) != (ent[_QOS] == 1):
                raise MQTTException("%s for a QoS %d message"
                                    % ("PUBACK" if t == 0x40 else "PUBCOMP", ent[_QOS]))
            self._finish(ent, _DONE)
            return
        if t == 0x90:
            if b0 != 0x90 or rl < 3:
                raise MQTTException("malformed SUBACK")
            pid = mv[a] << 8 | mv[a + 1]
            rc = mv[a + 2]
            if rc not in (0, 1, 2, 0x80):
                raise MQTTException("malformed SUBACK: return code 0x%02x" % rc)
            slot = self._subs.get(pid)
            if slot:
                slot[1] = rc
                slot[0].set()
            return
        if b0 == 0xD0:
            if rl:
                raise MQTTException("malformed PINGRESP")
            self._ping_t = None
            self._pong.set()
            return
        raise MQTTException("unexpected packet from broker: type 0x%02x" % b0)
