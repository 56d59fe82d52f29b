"""MQTT link keeper: reconnect supervisor with backoff, keepalive timer, bounded outbox (mixin)."""
import asyncio
from time import ticks_ms, ticks_diff
from micropython import const

from ovms.mqtt.wire import MQTTException, _b, _u16, _hdr, _reason

try:
    from random import getrandbits
except ImportError:  # pragma: no cover
    def getrandbits(n):
        return ticks_ms() & ((1 << n) - 1)

_SENT = const(1)
_REL = const(2)
_PID = const(0)
_ST = const(2)
_T = const(6)
_TRY = const(7)


class Keeper:
    """Supervisor part of MQTTClient: run(), backoff, keepalive, the outbox and its pump."""

    def queue(self, topic, msg, retain=False, qos=0, latest=False):
        """Queue a message for sending when the link is up (kept while it is down).

        latest=True: a queued message with the same topic is replaced (latest value wins).
        Bounded by outbox_items / outbox_bytes: when full, the oldest latest-value entry is
        dropped; if there is none the new message is refused (returns False). Every drop
        is counted in `dropped` and logged."""
        topic = _b(topic)
        msg = _b(msg)
        if latest:
            for e in self._ob:
                if e[4] and e[0] == topic:
                    self._obsize += len(msg) - len(e[1])
                    e[1] = msg
                    e[2] = retain
                    e[3] = qos
                    self._obev.set()
                    return True
        if self.up and not self._ob:
            # fast path: straight into the tx buffer (no hop through the pump task)
            if not qos:
                if self._put(_hdr(0x30 | (1 if retain else 0), 2 + len(topic) + len(msg)),
                             _u16(len(topic)), topic, msg):
                    return True
            elif len(self._inflight) < self.max_inflight:
                pid = self._newpid()
                if self._put(_hdr(0x30 | qos << 1 | (1 if retain else 0),
                                  4 + len(topic) + len(msg)),
                             _u16(len(topic)), topic, _u16(pid), msg):
                    self._inflight.append([pid, qos, _SENT, topic, msg, retain, ticks_ms(), 0,
                                           None])
                    return True
        size = len(topic) + len(msg)
        while self._ob and (len(self._ob) >= self.ob_items
                            or self._obsize + size > self.ob_bytes):
            k = 0
            while k < len(self._ob) and not self._ob[k][4]:
                k += 1
            if k == len(self._ob):
                break
            e = self._ob.pop(k)
            self._obsize -= len(e[0]) + len(e[1])
            self.dropped += 1
            self.log("outbox full: dropped %s" % e[0].decode())
        if len(self._ob) >= self.ob_items or self._obsize + size > self.ob_bytes:
            self.dropped += 1
            self.log("outbox full: refused %s" % topic.decode())
            return False
        self._ob.append([topic, msg, retain, qos, latest])
        self._obsize += size
        self._obev.set()
        return True

    def queued(self):
        """Number of messages waiting in the outbox plus unacknowledged QoS 1/2 messages."""
        return len(self._ob) + len(self._inflight)

    async def run(self):
        """Keep the link up until disconnect(): connect, run on_up, wait for the link to
        die, back off (exponential, capped, jittered; reset after `stable` s up), repeat."""
        self._stop = False
        while not self._stop:
            try:
                await self.connect()
            except Exception as e:  # OSError, MQTTException, TLS ValueError ...
                self.failures += 1
                self._set_err("connect failed: %s" % _reason(e))
                if isinstance(e, MQTTException) and e.args and e.args[0] in (4, 5):
                    self.auth_failed = True
                    self.failures = max(self.failures, 16)
                elif isinstance(e, MQTTException) and e.args and e.args[0] == 2:
                    self._ka_down()
                await self._pause()
                continue
            self.auth_failed = False
            t0 = ticks_ms()
            if self.on_up is not None:
                try:
                    await self.on_up(self.session_present)
                except Exception as e:
                    self._dead("on_up failed: %s" % _reason(e))
            await self._down.wait()
            if ticks_diff(ticks_ms(), t0) >= self.stable * 1000:
                self.failures = 0
            self.failures += 1
            if self._stop:
                break
            self.reconnects += 1
            await self._pause()

    def _ka_down(self):
        # CONNACK "identifier rejected": what an MQTT 3.1.1 broker answers to a keepalive
        # above its limit (mosquitto max_keepalive). Ask for less: halve it down to 10 s;
        # refused at 10 s too, it was the client id: back to the configured keepalive.
        ka = self.keepalive
        if ka == 10:
            self.keepalive = self.ka_want
            return
        self.keepalive = 60 if not ka else max(10, ka // 2)
        self.log("broker refused the connection with keepalive %d s: trying %d s"
                 % (ka, self.keepalive))

    def backoff_ms(self, failures=None):
        """Delay before the next attempt: min(max, min * 2^(n-1)), half of it jittered."""
        n = self.failures if failures is None else failures
        d = int(self.backoff_min * 1000) << min(max(n - 1, 0), 20)
        d = min(d, int(self.backoff_max * 1000))
        return d // 2 + (getrandbits(16) * (d - d // 2) >> 16)

    def kick(self):
        """Reconnect now (e.g. after a config change): drop the link, skip the backoff."""
        self.failures = 0
        self._kick.set()
        if self._w is not None:
            self._dead("reconnect requested")

    async def wait_up(self, timeout=None):
        if timeout is None:
            await self._upev.wait()
        else:
            await asyncio.wait_for_ms(self._upev.wait(), int(timeout * 1000))

    async def _pause(self):
        d = self.backoff_ms()
        self._kick.clear()
        try:
            await asyncio.wait_for_ms(self._kick.wait(), d)
        except asyncio.TimeoutError:
            pass

    async def _timer(self, gen):
        ka = int(self.keepalive * 1000)
        ack = int(self.ack_timeout * 1000)
        wait = 1000
        while True:
            # sleep until the next deadline (dead link, ping due), at most 1 s
            await asyncio.sleep_ms(wait)
            if gen != self._gen:
                return
            now = ticks_ms()
            wait = 1000
            if ka:
                rx = ticks_diff(now, self._last_rx)
                if rx > ka * 3 // 2:
                    self._dead("nothing received for %d ms (keepalive %d s)"
                               % (rx, self.keepalive))
                    return
                tx = ticks_diff(now, self._last_tx)
                if self._ping_t is None and (rx >= ka or tx >= ka):
                    await self.ping()
                    tx = 0
                wait = min(wait, ka * 3 // 2 + 1 - rx)
                if self._ping_t is None:
                    wait = min(wait, ka - max(rx, tx))
                wait = max(10, wait)
            for ent in self._inflight:
                st = ent[_ST]
                if (st == _SENT or st == _REL) and ticks_diff(now, ent[_T]) > ack:
                    if ent[_TRY] >= self.retries:
                        self._dead("no acknowledgement for packet id %d" % ent[_PID])
                        return
                    ent[_TRY] += 1
                    self.retransmits += 1
                    await self._send_ent(ent, True)
                    if gen != self._gen:
                        return

    async def _pump(self, gen):
        while True:
            if not self._ob:
                self._obev.clear()
                await self._obev.wait()
                continue
            e = self._ob[0]
            if e[3]:
                await self._slot_wait()
                if gen != self._gen or not self._ob or self._ob[0] is not e:
                    continue
                self._ob.pop(0)
                self._obsize -= len(e[0]) + len(e[1])
                ent = self._add(e[0], e[1], e[2], e[3], False)
                await self._send_ent(ent, False)
            else:
                await self._out(_hdr(0x30 | (1 if e[2] else 0), 2 + len(e[0]) + len(e[1])),
                                _u16(len(e[0])), e[0], e[1])
                if self._ob and self._ob[0] is e:
                    self._ob.pop(0)
                    self._obsize -= len(e[0]) + len(e[1])
