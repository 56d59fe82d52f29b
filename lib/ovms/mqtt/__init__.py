"""Non-blocking asyncio MQTT 3.1.1 client: TLS, QoS 0/1/2, keepalive deadline, backoff, outbox."""
# Method names follow umqtt.simple (connect, publish, subscribe, set_callback, set_last_will,
# disconnect) but every network wait is an asyncio wait with a deadline, so the event loop
# (and CAN draining) never stalls on the network.
#
# Design (RAM ~ txbuf + rxbuf + a few small objects):
# - One connection = four tasks: reader (parses into a preallocated rx buffer), writer (sends a
#   preallocated tx buffer; packets queued while it writes coalesce into one TLS record),
#   timer (keepalive + retransmission), pump (drains the bounded outbox).
# - Liveness: a PINGREQ goes out once nothing was received or sent for `keepalive` s; the
#   link is declared dead when nothing at all was received for 1.5 x keepalive, so a
#   half-open link is detected within 1.5 x keepalive of the last byte from the broker.
# - QoS 1/2 messages stay in the in-flight list until acknowledged: retransmitted with DUP
#   after `ack_timeout` (the link is dropped after `retries` tries), resent after a
#   reconnect (new packet ids unless the broker kept the session).
# - run() keeps the link up: reconnect with capped exponential backoff + jitter.
# - Malformed packets from the broker close the connection with a reason (last_error);
#   nothing raised by the broker's bytes escapes the connection's tasks. A PUBLISH larger
#   than the rx buffer is skipped in place (acknowledged, counted, on_big called), so a
#   retained oversized message cannot keep the link down.
import asyncio
from time import ticks_ms
from micropython import const

from ovms.mqtt.wire import (MQTTException, CONNACK_ERRORS, Receiver, _b, _u16, _str,
                             _hdr, _reason)
from ovms.mqtt.link import Keeper

_NEW = const(0)    # not sent on the current connection yet
_SENT = const(1)   # PUBLISH sent, waiting for PUBACK / PUBREC
_REL = const(2)    # PUBREL sent, waiting for PUBCOMP
_DONE = const(3)
_GONE = const(4)   # given up (caller cancelled / timed out)

# in-flight entry: [pid, qos, state, topic, msg, retain, t_sent, tries, event]
_PID = const(0)
_QOS = const(1)
_ST = const(2)
_TOP = const(3)
_MSG = const(4)
_RET = const(5)
_T = const(6)
_TRY = const(7)
_EV = const(8)

try:
    from errno import EINPROGRESS as _EINPROGRESS
except ImportError:  # pragma: no cover
    _EINPROGRESS = 115


def cert_ders(data):
    """CA data (PEM with one or more certificates, or DER) -> list of DER certificates."""
    if isinstance(data, str):
        data = data.encode()
    if data[:1] == b"\x30":
        return [bytes(data)]
    from binascii import a2b_base64
    beg = b"-----BEGIN CERTIFICATE-----"
    end = b"-----END CERTIFICATE-----"
    out = []
    i = 0
    while True:
        a = data.find(beg, i)
        if a < 0:
            break
        e = data.find(end, a)
        if e < 0:
            raise ValueError("truncated PEM certificate")
        out.append(a2b_base64(data[a + len(beg):e]))
        i = e + len(end)
    if not out:
        raise ValueError("no certificate found in CA data")
    return out


def ssl_context(cafile=None, cadata=None):
    """TLS client context with CA verification on (hostname checked via server_hostname).

    cafile: path of a PEM (one or more certificates) or DER file on flash. PEM is converted
    to DER here because not every MicroPython port's mbedtls is built with PEM parsing."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cafile:
        with open(cafile, "rb") as f:
            cadata = f.read()
    if cadata:
        for der in cert_ders(cadata):
            ctx.load_verify_locations(cadata=der)
    return ctx


class MQTTClient(Keeper, Receiver):
    """asyncio MQTT 3.1.1 client. `ssl`: None/False = plain TCP, an SSLContext (see
    ssl_context), or True = verifying context with no CA (refuses every server)."""

    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=60,
                 ssl=None, server_hostname=None, clean_session=True, max_packet=2048,
                 txbuf=1024, max_inflight=4, ack_timeout=10, retries=3, connect_timeout=20,
                 backoff_min=1, backoff_max=300, stable=60, outbox_items=32,
                 outbox_bytes=4096):
        if ssl is True:
            ssl = ssl_context()
        self.client_id = _b(client_id)
        self.server = server
        self.port = port or (8883 if ssl else 1883)
        self.user = _b(user) if user else None
        self.pswd = _b(password) if password else None
        self.keepalive = keepalive     # in use; lowered when the broker refuses ka_want
        self.ka_want = keepalive
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.clean_session = clean_session
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable = stable
        self.ob_items = outbox_items
        self.ob_bytes = outbox_bytes
        self.cb = None
        self.lw = None
        self.on_up = None      # async fn(session_present), run after each CONNACK
        self.on_down = None    # fn(reason)
        self.on_big = None     # fn(topic, size, retained): a PUBLISH too big to receive
        self.log = self._print
        # state
        self.up = False
        self.session_present = False
        self.auth_failed = False
        self.last_error = ""
        # counters (MQTT layer: whole packets, before TLS/TCP)
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.connects = 0
        self.reconnects = 0
        self.failures = 0
        self.retransmits = 0
        self.duplicates = 0    # QoS 2 redeliveries not passed on again
        self.dropped = 0
        self.pings = 0
        self.skipped = 0       # oversized PUBLISHes skipped (acknowledged, not delivered)
        # buffers
        self._rxsize = max_packet
        self._rxbuf = bytearray(max_packet)
        self._rxmv = memoryview(self._rxbuf)
        self._skip = 0         # bytes of a skipped oversized PUBLISH still to drop
        self._txsize = txbuf
        self._txbuf = bytearray(txbuf)
        self._txmv = memoryview(self._txbuf)
        self._txn = 0
        # connection
        self._r = self._w = self._pend = None
        self._ai = None     # (server, port, getaddrinfo entry) of the last good lookup
        self._busy = False
        self._gen = 0
        self._tasks = []
        self._pid = 0
        self._inflight = []
        self._frail = []       # in-flight entries abandoned when the link drops
        self._subs = {}
        self._rx2 = set()
        self._ob = []          # [topic, msg, retain, qos, latest]
        self._obsize = 0
        self._last_rx = self._last_tx = ticks_ms()
        self._ping_t = None
        self._stop = False
        self._txlock = asyncio.Lock()
        self._txev = asyncio.Event()
        self._room = asyncio.Event()
        self._slot = asyncio.Event()
        self._obev = asyncio.Event()
        self._down = asyncio.Event()
        self._upev = asyncio.Event()
        self._kick = asyncio.Event()
        self._pong = asyncio.Event()

    @staticmethod
    def _print(msg):
        print("mqtt:", msg)

    # ---- umqtt-style API ----------------------------------------------------------------

    def set_callback(self, f):
        """f(topic: bytes, msg: bytes, retained: bool, qos: int, dup: bool), called once
        per message (QoS 2: exactly once). Runs in the receive path: it must not block or
        await; hand work to a task."""
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        self.lw = (_b(topic), _b(msg), retain, qos)

    def isconnected(self):
        return self.up

    async def connect(self, clean_session=None, timeout=None):
        """Open the link (TCP/TLS, CONNECT, CONNACK) within `timeout` s. Returns the
        session-present flag. Raises OSError / MQTTException / ValueError (TLS) on failure."""
        if clean_session is not None:
            self.clean_session = clean_session
        if self._w is not None:
            self._dead("reconnecting")
        self._pend = None
        try:
            sp = await asyncio.wait_for_ms(self._open(),
                                           int((timeout or self.connect_timeout) * 1000))
        except asyncio.TimeoutError:
            self._close_pending()
            self._ai = None     # resolve again next time: the address may have changed
            raise OSError("timeout connecting to %s:%d" % (self.server, self.port))
        except BaseException:
            self._close_pending()
            self._ai = None
            raise
        r, w = self._pend
        self._pend = None
        self._start(r, w, sp)
        return sp

    async def disconnect(self):
        """Send DISCONNECT (the broker then drops the last will), close, stop run()."""
        self._stop = True
        self._kick.set()
        if self._w is not None:
            try:
                await self._out(b"\xe0\x00")
                await asyncio.wait_for_ms(self._drained(), 2000)
            except Exception:
                pass
            self._dead("disconnected")

    def shutdown(self, topic=None, msg=b"", retain=True):
        """Synchronous goodbye that needs no running event loop (e.g. after the app's loop
        was replaced): queued packets, an optional final QoS 0 PUBLISH and DISCONNECT go
        straight to the socket (best effort), then the link is closed and run() ends."""
        self._stop = True
        self._kick.set()
        w = self._w
        if w is None:
            return
        try:
            if not self._busy and not self._txlock.locked() and not w.out_buf:
                p = bytearray(self._txmv[:self._txn])
                if topic:
                    t = _b(topic)
                    m = _b(msg)
                    p += _hdr(0x31 if retain else 0x30, 2 + len(t) + len(m))
                    p += _u16(len(t)) + t + m
                p += b"\xe0\x00"
                w.s.write(p)
        except Exception:
            pass
        self._dead("disconnected")

    async def publish(self, topic, msg, retain=False, qos=0, timeout=None, frail=False):
        """QoS 0: queue the packet for the writer (raises OSError if the link is down).
        QoS 1/2: return once acknowledged; kept across reconnects until then. With a
        timeout (s) the message is abandoned and OSError raised when it expires.
        msg may be a list of parts (QoS 1/2), each bytes or a list of bytes: sent as one
        message, part by part, without joining them (long replies).
        frail=True: abandoned (OSError ECONNRESET) if the link drops while it is in flight,
        so the caller can tell a message the broker refuses by closing the link."""
        topic = _b(topic)
        if not isinstance(msg, list):
            msg = _b(msg)
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if not qos:
            if not self.up:
                raise OSError(107)  # ENOTCONN
            await self._out(_hdr(0x30 | (1 if retain else 0), 2 + len(topic) + len(msg)),
                            _u16(len(topic)), topic, msg)
            return
        ent = await self._submit(topic, msg, retain, qos, True)
        if frail:
            self._frail.append(ent)
        try:
            if timeout is None:
                await ent[_EV].wait()
            else:
                await asyncio.wait_for_ms(ent[_EV].wait(), int(timeout * 1000))
        except asyncio.TimeoutError:
            self._drop(ent)
            raise OSError(110)  # ETIMEDOUT
        except BaseException:
            self._drop(ent)
            raise
        finally:
            ent[_EV] = None
            if frail:
                self._frail.remove(ent)
        if ent[_ST] == _GONE:
            raise OSError(104)  # ECONNRESET: the link dropped while it was in flight

    async def _acked(self, kind, topic, tail, timeout):
        # SUBSCRIBE (0x82) / UNSUBSCRIBE (0xA2) with a new packet id; waits for the ack
        pid = self._newpid()
        slot = [asyncio.Event(), None]
        self._subs[pid] = slot
        try:
            await self._out(_hdr(kind, 4 + len(topic) + len(tail)), _u16(pid), _u16(len(topic)),
                            topic, tail)
            await asyncio.wait_for_ms(slot[0].wait(), int((timeout or self.ack_timeout) * 1000))
        except asyncio.TimeoutError:
            self._dead("no %s for %s" % ("SUBACK" if kind == 0x82 else "UNSUBACK", topic.decode()))
            raise OSError(110)
        finally:
            self._subs.pop(pid, None)
        return slot[1]

    async def subscribe(self, topic, qos=0, timeout=None):
        """Subscribe and wait for SUBACK; returns the granted QoS. MQTTException if refused."""
        topic = _b(topic)
        r = await self._acked(0x82, topic, bytes((qos,)), timeout)
        if r is None:
            raise OSError(107)
        if r == 0x80:
            raise MQTTException("subscription to %s refused" % topic.decode())
        return r

    async def unsubscribe(self, topic, timeout=None):
        await self._acked(0xA2, _b(topic), b"", timeout)

    async def ping(self):
        self._ping_t = ticks_ms()
        self.pings += 1
        self._pong.clear()
        await self._out(b"\xc0\x00")

    async def sync(self, timeout=None):
        """Ping round trip: everything the broker sent before its PINGRESP has arrived
        (e.g. the retained messages of a SUBSCRIBE)."""
        await self.ping()
        try:
            await asyncio.wait_for_ms(self._pong.wait(),
                                      int((timeout or self.ack_timeout) * 1000))
        except asyncio.TimeoutError:
            self._dead("no PINGRESP")
            raise OSError(110)
        if not self.up:
            raise OSError(107)

    # ---- bounded outbox -----------------------------------------------------------------



    # ---- supervisor ---------------------------------------------------------------------






    def _set_err(self, msg):
        self.last_error = msg
        self.log(msg)

    # ---- connection internals -----------------------------------------------------------

    def _close_pending(self):
        p = self._pend
        self._pend = None
        if p:
            try:
                p[1].s.close()
            except Exception:
                pass

    async def _open(self):
        # like asyncio.open_connection, plus TCP_NODELAY: small packets (acks, replies)
        # must not wait for the peer's delayed ACK (Nagle: ~40 ms per round trip)
        import socket
        # the lookup blocks the loop (lwIP: until the DNS server answers): once, then cached
        # until a connect fails
        ai = self._ai
        if ai is None or ai[0] != self.server or ai[1] != self.port:
            ai = self._ai = (self.server, self.port,
                             socket.getaddrinfo(self.server, self.port, 0, socket.SOCK_STREAM)[0])
        ai = ai[2]
        s = socket.socket(ai[0], ai[1], ai[2])
        s.setblocking(False)
        try:
            s.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY
        except (OSError, AttributeError):
            pass
        w = asyncio.StreamWriter(s)
        self._pend = (w, w)
        try:
            s.connect(ai[-1])
        except OSError as e:
            if e.errno != _EINPROGRESS:
                raise
        if self.ssl:
            s = self.ssl.wrap_socket(s, server_hostname=self.server_hostname or self.server,
                                     do_handshake_on_connect=False)
            s.setblocking(False)
            w = asyncio.StreamWriter(s)
            self._pend = (w, w)
        r = w
        # CONNECT
        flags = 0x02 if self.clean_session else 0
        n = 10 + 2 + len(self.client_id)
        if self.lw:
            t, m, ret, q = self.lw
            flags |= 0x04 | (q << 3) | (0x20 if ret else 0)
            n += 4 + len(t) + len(m)
        if self.user:
            flags |= 0x80
            n += 2 + len(self.user)
            if self.pswd:
                flags |= 0x40
                n += 2 + len(self.pswd)
        p = bytearray(_hdr(0x10, n))
        p += b"\x00\x04MQTT\x04"
        p.append(flags)
        p += _u16(self.keepalive)
        p += _str(self.client_id)
        if self.lw:
            p += _str(self.lw[0])
            p += _str(self.lw[1])
        if self.user:
            p += _str(self.user)
            if self.pswd:
                p += _str(self.pswd)
        w.write(p)
        await w.drain()
        self.tx_bytes += len(p)
        # CONNACK
        mv = self._rxmv
        got = 0
        while got < 4:
            k = await r.readinto(mv[got:4])
            if k is None:
                continue
            if not k:
                raise OSError("connection closed by the broker before CONNACK")
            got += k
        self.rx_bytes += 4
        b = self._rxbuf
        if b[0] != 0x20 or b[1] != 2 or b[2] & 0xFE:
            raise MQTTException("malformed CONNACK %02x %02x %02x %02x"
                                % (b[0], b[1], b[2], b[3]))
        if b[3]:
            raise MQTTException(b[3], "connection refused: "
                                + CONNACK_ERRORS.get(b[3], "code %d" % b[3]))
        return bool(b[2] & 1)

    def _start(self, r, w, sp):
        self._gen += 1
        self._r, self._w = r, w
        self._txn = 0
        self._last_rx = self._last_tx = ticks_ms()
        self._ping_t = None
        self.session_present = sp
        if not sp:
            self._rx2 = set()
        self._down.clear()
        self.up = True
        self.connects += 1
        self.last_error = ""
        gen = self._gen
        ct = asyncio.create_task
        self._tasks = [ct(self._reader(r, gen)), ct(self._writer(w)), ct(self._timer(gen)),
                       ct(self._pump(gen))]
        # unacknowledged QoS 1/2 messages go again: same ids + DUP if the broker kept the
        # session, otherwise as new messages with new ids
        for e in self._inflight:
            if sp and e[_ST] in (_SENT, _REL):
                e[_ST] = -e[_ST]  # negative: resend with DUP / resend PUBREL
            else:
                e[_PID] = self._newpid()
                e[_ST] = _NEW
            e[_TRY] = 0
        if self._inflight:
            self._tasks.append(ct(self._resend(gen)))
        self._upev.set()

    def _dead(self, reason):
        if self._w is None:
            return
        w = self._w
        self._r = self._w = None
        self.up = False
        self._upev.clear()
        self._pong.set()
        self._gen += 1
        self._set_err("link down: " + reason)
        cur = asyncio.current_task()
        for t in self._tasks:
            if t is not cur:
                t.cancel()
        self._tasks = []
        try:
            w.s.close()
        except Exception:
            pass
        self._txn = 0
        self._busy = False
        self._ping_t = None
        for e in self._frail:
            if e[_ST] == _SENT or e[_ST] == _REL:
                self._finish(e, _GONE)
        for slot in self._subs.values():
            slot[0].set()
        self._room.set()
        self._down.set()
        if self.on_down is not None:
            try:
                self.on_down(reason)
            except Exception as e:
                self.log("on_down: %s" % _reason(e))

    async def _drained(self):
        while (self._txn or self._busy) and self._w is not None:
            await asyncio.sleep_ms(5)

    def _put(self, *parts):
        """Append one packet to the tx buffer now if it fits (no waiting): True if done."""
        if self._w is None or self._txlock.locked():
            return False
        n = self._txn
        total = 0
        for p in parts:
            total += len(p)
        if n + total > self._txsize:
            return False
        for p in parts:
            k = len(p)
            self._txbuf[n:n + k] = p
            n += k
        self._txn = n
        self.tx_bytes += total
        self._txev.set()
        return True

    async def _out(self, *parts, more=None):
        """Append one packet (given as parts, then the list `more` of parts) to the tx
        buffer; the writer sends it."""
        if self._w is None:
            raise OSError(107)
        if more is None and self._put(*parts):
            return
        if more is not None:
            parts = (parts, more)
        else:
            parts = (parts,)
        total = 0
        gen = self._gen
        async with self._txlock:     # a packet larger than the free space: copy in pieces
            for ps in parts:
                for p in ps:
                    if isinstance(p, list):
                        for q in p:
                            total += len(q)
                            await self._copy(memoryview(q), gen)
                    else:
                        total += len(p)
                        await self._copy(memoryview(p), gen)
        self.tx_bytes += total
        self._txev.set()

    async def _copy(self, mv, gen):
        # copy mv into the tx buffer, waiting for the writer to make room (under _txlock)
        off = 0
        while off < len(mv):
            if gen != self._gen:
                raise OSError(107)
            free = self._txsize - self._txn
            if not free:
                self._room.clear()
                self._txev.set()
                await self._room.wait()
                continue
            k = min(free, len(mv) - off)
            n = self._txn
            self._txbuf[n:n + k] = mv[off:off + k]
            self._txn = n + k
            off += k

    async def _writer(self, w):
        try:
            while True:
                n = self._txn
                if not n:
                    self._txev.clear()
                    await self._txev.wait()
                    continue
                self._busy = True
                w.write(self._txmv[:n])  # the stream copies what the socket does not take
                self._txn = 0
                self._room.set()
                await w.drain()
                self._busy = False
                self._last_tx = ticks_ms()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._dead("write failed: %s" % _reason(e))






    async def _resend(self, gen):
        for ent in list(self._inflight):
            if gen != self._gen:
                return
            st = ent[_ST]
            if st == _NEW:
                await self._send_ent(ent, False)
            elif st < 0:
                ent[_ST] = -st
                await self._send_ent(ent, True)

    async def _slot_wait(self):
        while len(self._inflight) >= self.max_inflight:
            self._slot.clear()
            await self._slot.wait()

    def _add(self, topic, msg, retain, qos, wait):
        ent = [self._newpid(), qos, _NEW, topic, msg, retain, 0, 0,
               asyncio.Event() if wait else None]
        self._inflight.append(ent)
        return ent

    async def _submit(self, topic, msg, retain, qos, wait):
        await self._slot_wait()
        ent = self._add(topic, msg, retain, qos, wait)
        if self.up:
            try:
                await self._send_ent(ent, False)
            except OSError:
                pass  # link died: sent again after the reconnect
        return ent

    async def _send_ent(self, ent, dup):
        pid = ent[_PID]
        ent[_T] = ticks_ms()
        if ent[_ST] == _REL:
            await self._out(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
            return
        ent[_ST] = _SENT
        t = ent[_TOP]
        m = ent[_MSG]
        b0 = 0x30 | ent[_QOS] << 1 | (1 if ent[_RET] else 0) | (8 if dup else 0)
        if isinstance(m, list):     # parts: length first, then the parts one by one
            n = 0
            for p in m:
                if isinstance(p, list):
                    for q in p:
                        n += len(q)
                else:
                    n += len(p)
            await self._out(_hdr(b0, 4 + len(t) + n), _u16(len(t)), t, _u16(pid), more=m)
            return
        await self._out(_hdr(b0, 4 + len(t) + len(m)), _u16(len(t)), t, _u16(pid), m)

    def _finish(self, ent, st):
        ent[_ST] = st
        try:
            self._inflight.remove(ent)
        except ValueError:
            pass
        if ent[_EV] is not None:
            ent[_EV].set()
        self._slot.set()

    def _drop(self, ent):
        if ent[_ST] != _DONE:
            self._finish(ent, _GONE)

    def _newpid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            pid = self._pid
            if pid in self._subs:
                continue
            for e in self._inflight:
                if e[_PID] == pid:
                    break
            else:
                return pid
