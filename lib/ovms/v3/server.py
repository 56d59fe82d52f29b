"""OVMS v3 MQTT protocol: metric/notify/event topics, commands, peers, delta publishing."""
# Topics (prefix = server.v3 topic.prefix, default ovms/<user>/<vehicle id>/):
#   metric/<name with . -> />       retained, QoS 0, metrics.text() (OVMS AsString format)
#   metric/s/v3/connected           "yes" once connected; last will "no" (retained)
#   metric/s/v3/stale               retained list of the stale metrics: ",v.b.soc,v.p.speed,"
#                                   ("," when none; see below)
#   notify/<type>/<subtype path>    QoS 1, from the persistent flash outbox (ovms.v3.outbox)
#   event/<name path> (+ legacy "event" = name)  QoS 0, only while connected
#   client/<cid>/response/<id>      QoS 1, reply to client/<cid>/command/<id> (ovms.shell);
#                                   commands are trusted (as OVMS v3) or, with server.v3
#                                   commands signed, secure ones must be signed (ovms.v3.cmdsig)
#   client/<cid>/metric/done        QoS 1, count of metrics republished for
#                                   client/<cid>/request/metric ("*" or "a.b*,c.d" patterns)
# Subscriptions: client/+/active (QoS 1; peers expire after 120 s; s.v3.peers), status (the
# Home Assistant OVMS integration's retained online/offline: a viewer while online),
# client/+/command/+ (QoS 2, so a QoS 2 command runs exactly once), client/+/request/metric.
# Retained commands and requests replayed by the broker are ignored (they would run again on
# every reconnect), and so are empty ones (that is how a retained message is deleted).
#
# Stale marking (the choice): a stale metric keeps its last value on metric/<path> (the last
# known SOC or parking position is still the best information a client can get), and ONE
# retained topic metric/s/v3/stale lists the metrics whose value is old, comma-delimited with
# a comma at each end (",v.b.soc,v.p.speed,"; "," when none), so a client tests one metric
# with ",name," in payload (Home Assistant's availability templates do). OVMS clients that
# do not know it see one more module metric, nothing that shadows a vehicle metric (earlier
# versions' per-metric stale/<path> markers looked like new metrics to such clients). The
# list is republished on every connect and whenever a metric turns stale or fresh. On the
# first connect after boot, markers an earlier version left under stale/# are deleted.
#
# Secrets: secret config values (passwords, keys) are never printed by any command (the config
# commands show ******** for them), so replies are not searched for them: a scrubber that masks
# a secret wherever it appears would tell a guesser which guess is the password.
# client/+/request/config is not served at all.
import asyncio
from time import ticks_ms, ticks_diff
from micropython import const

from ovms import config, metrics
from ovms.mqtt import MQTTClient, ssl_context
from ovms.v3.outbox import Outbox
from ovms.v3.sched import Scheduler

_POLL_MS = const(250)     # change collection / priority latency
_CHUNK = const(8)         # publications between yields to the event loop
_PEER_TTL = const(120)
_MAX_PEERS = const(16)
_MAX_REQS = const(4)
_POISON = const(3)        # link drops with the same notification in flight: set it aside
_FULL_MIN_S = const(60)   # at most one full republish (update all) and one publication of a
                          # metric for request/metric per this many seconds (amplification)
_HA_CHECK_S = const(30)   # seconds between looks for metrics with a first value (discovery)
_STALE_S = const(1)       # seconds between stale-marker scans (32 metrics per poll)
_LINK = ("server", "port", "tls", "user", "clientid", "topic.prefix", "ca",
         "updatetime.keepalive")


def _ndefined():
    """How many metrics have a value."""
    n = 0
    for i in range(metrics.count()):
        if metrics.defined(i):
            n += 1
    return n


def _cfg(inst):
    return config.get("server.v3", inst)


def _store_path():
    r = config.root() if hasattr(config, "root") else "/store"
    return (r.rstrip("/") or "") + "/v3notify.q"


class Server:
    """One OVMS v3 server: builds the MQTT link from config, runs it, publishes."""

    def __init__(self, outbox=None):
        self.ob = outbox if outbox is not None else Outbox(_store_path())
        self.client = None
        self.sched = None
        self.prefix = ""
        self.peers = {}
        self.ready = False
        self.state = "stopped"
        self.published = 0
        self.notified = 0
        self.requests = 0
        self._strike = [0, 0]   # [seq, link drops] of the notification in flight
        self._held = None       # Outbox of set-aside notifications, opened when needed
        self._full_t = -_FULL_MIN_S    # uptime of the last full republish
        self._rq_t = -_FULL_MIN_S      # start of the request/metric window
        self._rq_bits = None    # metrics published for requests in that window (bitmap)
        self.coalesced = 0      # metric values not republished for a request (window)
        self._reqs = []
        self._tasks = []
        self._stop = False
        self._sendall = False
        self._every = 0
        self._first = True      # first connect this boot: delete old stale/<path> markers
        self._old = None
        self._stale_dirty = False
        self._hab = None        # Home Assistant's status topic (discovery on)
        self._ha_force = False
        self._ha_ft = -_FULL_MIN_S  # uptime of the last announcement of everything
        self._ha_due = 0        # uptime when discovery runs after a connect (0: not due)
        self._ha_n = -1         # metrics with a value at the last discovery run (-1: none yet)
        self._ha_chk = 0        # uptime of the last look for metrics with a first value
        self._ha_prune = True   # the due run may remove entities (after a connect)
        self.ha = (0, 0, 0)     # discovery: entities published, removed, bytes (last run)
        self._restart = asyncio.Event()
        self._nev = asyncio.Event()
        self._rev = asyncio.Event()
        self._otaq = []         # (cid, op, payload) of OTA requests, handled one at a time
        self._oev = asyncio.Event()
        self.beat = ticks_ms()   # last turn of the publisher loop (liveness)
        self._ci = metrics.find("s.v3.connected")
        self._pi = metrics.find("s.v3.peers")

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self):
        """Run until stop(): (re)build the link whenever its config changes."""
        config.on_change(self._on_config)
        try:
            while not self._stop:
                self._restart.clear()
                err = "not configured (config set server.v3 server <host>)"
                try:
                    c = self._build()
                except Exception as e:
                    c = None
                    err = "error: %s" % (e,)
                if c is None:
                    self.state = err
                    await self._restart.wait()
                    continue
                self.client = c
                self.state = "connecting"
                ct = asyncio.create_task
                self._tasks = [ct(c.run()), ct(self._publisher()), ct(self._notifier()),
                               ct(self._requests()), ct(self._ota())]
                await self._restart.wait()
                await self._close()
        finally:
            try:
                config.off_change(self._on_config)
            except Exception:
                pass
            await self._close()
            self.state = "stopped"

    async def stop(self):
        self._stop = True
        self._restart.set()

    @property
    def connected(self):
        """Link up, subscribed and the full republish done."""
        c = self.client
        return bool(self.ready and c is not None and c.up)

    def goodbye(self):
        """Stop now without the event loop: connected=no, DISCONNECT, close (see stop())."""
        self._stop = True
        self.ready = False
        c = self.client
        if c is not None:
            c.shutdown(self.prefix + "metric/s/v3/connected", "no")
        self._restart.set()
        self._set("s.v3.connected", False)

    async def _close(self):
        c = self.client
        self.ready = False
        for t in self._tasks[1:]:
            t.cancel()
        if c is not None:
            if c.up:
                try:
                    await c.publish(self.prefix + "metric/s/v3/connected", "no", retain=True)
                except Exception:
                    pass
            await c.disconnect()
        for t in self._tasks[:1]:
            t.cancel()
        self._tasks = []
        self.client = None
        self._set("s.v3.connected", False)

    def _build(self):
        host = _cfg("server")
        if not host:
            return None
        tls = _cfg("tls")       # schema default yes: plain TCP only when set to no
        ctx = None
        if tls:
            ca = _cfg("ca")
            try:
                ctx = ssl_context(cafile=ca)
            except OSError:
                raise ValueError("cannot read CA file %s (server.v3 ca)" % ca)
        user = _cfg("user") or ""
        vid = config.get("vehicle", "id") or ""
        pfx = _cfg("topic.prefix") or ("ovms/%s/" % user + ("%s/" % vid if vid else ""))
        if not pfx.endswith("/"):
            pfx += "/"
        self.prefix = pfx
        self._pb = pfx.encode()
        c = MQTTClient(_cfg("clientid") or vid or "ovms", host, _cfg("port") or 0,
                       user or None, config.get("password", "server.v3") or None,
                       keepalive=_cfg("updatetime.keepalive"), ssl=ctx)
        c.set_last_will(pfx + "metric/s/v3/connected", "no", retain=True)
        c.set_callback(self._on_msg)
        c.on_big = self._on_big
        c.on_up = self._on_up
        c.on_down = self._on_down
        c.log = _log
        kw = self._sched_cfg()
        if self.sched is None:
            self.sched = Scheduler(**kw)
        else:
            self.sched.configure(**kw)
        return c

    def _sched_cfg(self):
        # OVMS resends everything every 1200 s; here a full republish follows every connect,
        # and a periodic one only if updatetime.sendall is set (default 0 = off)
        self._every = _cfg("updatetime.sendall")
        iv = tuple(_cfg("updatetime." + k)
                   for k in ("on", "charging", "connected", "awake", "idle"))
        return {"intervals": iv, "include": _cfg("metrics.include"),
                "exclude": _cfg("metrics.exclude"),
                "priority": (_cfg("metrics.priority") or "") + ",s.v3.*"}

    def _on_config(self, param, inst):
        if ((param == "server.v3" and inst in _LINK) or (param == "vehicle" and inst == "id")
                or (param == "password" and inst == "server.v3")):
            self._restart.set()
        elif param == "server.v3" and self.sched is not None:
            self.sched.configure(**self._sched_cfg())

    # ---- connection events ----------------------------------------------------------

    async def _on_up(self, session_present):
        c = self.client
        p = self.prefix
        self.ready = False
        self.state = "subscribing"
        await c.subscribe(p + "client/+/active", 1)
        await c.subscribe(p + "client/+/command/+", 2)
        await c.subscribe(p + "client/+/request/metric", 1)
        await c.subscribe(p + "client/+/ota/+", 1)
        await c.subscribe(p + "status", 1)     # a viewer's retained online/offline (with will)
        if _cfg("ha.discovery"):
            self._hab = ((_cfg("ha.prefix") or "homeassistant") + "/status").encode()
            await c.subscribe(self._hab, 1)    # Home Assistant's birth: announce again
        self._set("s.v3.connected", True)
        await c.publish(p + "metric/s/v3/connected", "yes", retain=True)
        if self._first:             # markers of an earlier version (stale/<path>): delete
            self._old = []
            await c.subscribe(p + "stale/#", 0)
            await c.sync()          # retained markers arrive before the PINGRESP
            await c.unsubscribe(p + "stale/#")
            old, self._old = self._old, None
            for t in old:
                await c.publish(t, "", retain=True)
            self._first = False
        await self._republish()
        self._ha_due = metrics.uptime() + 5     # discovery once the connect's work is done
        self._ha_prune = True
        self.ready = True
        self.state = "connected"
        self._nev.set()

    def _on_down(self, reason):
        self.ready = False
        self.state = "reconnecting (%s)" % reason
        self._set("s.v3.connected", False)

    def _set(self, name, v):
        i = metrics.find(name)
        if i >= 0:
            try:
                metrics.set(i, v)
            except ValueError:
                pass

    # ---- metrics --------------------------------------------------------------------

    async def _republish(self):
        """Full republish (after a connect or `server v3 update all`)."""
        s = self.sched
        now = metrics.uptime()
        self._full_t = now
        k = 0
        for i in s.all():
            if i != self._ci:
                await self._pub_metric(i, now)
            else:
                s.sent(i, now)
            s.set_marked(i, metrics.stale(i))
            k += 1
            if not k % _CHUNK:
                await asyncio.sleep_ms(0)
        await self._pub_stale()

    async def _pub_metric(self, i, now):
        v = metrics.text(i)
        if not v and metrics.get(i) is None:
            # no value (decoded outside its valid range or map): nothing to send, as OVMS
            # sends no undefined metric; the last value stays retained on the broker
            self.sched.sent(i, now)
            return
        n = metrics.name(i)
        t = self.prefix + "metric/" + n.replace(".", "/")
        await self.client.publish(t, v, retain=self._retain(t))
        self.sched.sent(i, now)
        self.published += 1
        if n == "v.p.longitude" and self._hab is not None:
            await self._pub_position()

    async def _pub_position(self):
        # Home Assistant's device tracker wants latitude and longitude in one JSON message
        la, lo = metrics.get("v.p.latitude"), metrics.get("v.p.longitude")
        if la is None or lo is None:
            return
        h = metrics.get("v.p.gpshdop")
        await self.client.publish(
            self.prefix + "ha/position", '{"latitude":%s,"longitude":%s,"gps_accuracy":%d}'
            % (metrics.text("v.p.latitude"), metrics.text("v.p.longitude"),
               int(h * 5) if h else 10), retain=True)

    async def _discovery(self, force=False, prune=True):
        """Home Assistant MQTT discovery (ovms.v3.hadisc, loaded for the run and dropped)."""
        import gc
        import ovms
        gc.collect()
        self._ha_n = _ndefined()
        try:
            self.ha = await ovms.load("v3.hadisc").publish(self.client, self.prefix, force, prune)
        except OSError:
            raise
        except Exception as e:
            _log("discovery: %r" % (e,))
        finally:
            ovms.unload("v3.hadisc")

    async def _pub_stale(self):
        """The retained list of stale metrics (metric/s/v3/stale): ",a.b,c.d," or ","."""
        b = bytearray(b",")
        for i in self.sched.marked_all():
            b += metrics.name(i).encode()
            b += b","
        await self.client.publish(self.prefix + "metric/s/v3/stale", b, retain=True)

    def _retain(self, t):
        return not (_cfg("retain.depth.limit") and t.count("/") > 7)

    async def _publisher(self):
        last = 0
        start = 0
        full = metrics.uptime()
        while True:
            self.beat = ticks_ms()
            await asyncio.sleep_ms(_POLL_MS)
            c = self.client
            if c is None or not c.up or not self.ready:
                continue
            s = self.sched
            try:
                now = metrics.uptime()
                self._expire(now)
                # periodic full resend (only if configured), or `update all` (any client:
                # at most one per _FULL_MIN_S, requests meanwhile wait and coalesce)
                if (self._every and now - full >= self._every) or \
                        (self._sendall and now - self._full_t >= _FULL_MIN_S):
                    full = now
                    self._sendall = False
                    await self._republish()
                # Home Assistant's birth: everything again, at most once per _FULL_MIN_S (a
                # flood of births waits and coalesces); after a connect: what changed
                force = self._ha_force and now - self._ha_ft >= _FULL_MIN_S
                if force or (self._ha_due and now >= self._ha_due):
                    if force:
                        self._ha_force, self._ha_ft = False, now
                    self._ha_due = 0
                    await self._discovery(force, self._ha_prune)
                elif self._ha_n >= 0 and now - self._ha_chk >= _HA_CHECK_S:
                    # metrics that got their first value since (the car woke up): their
                    # entities are announced after a short wait that gathers the others
                    self._ha_chk = now
                    if _cfg("ha.discovery") and _ndefined() > self._ha_n:
                        self._ha_due, self._ha_prune = now + 5, False
                s.collect()
                k = 0
                for i in s.due(now):
                    await self._pub_metric(i, now)
                    k += 1
                    if not k % _CHUNK:
                        await asyncio.sleep_ms(0)
                if start or now - last >= _STALE_S:
                    last = now
                    ch, start = s.stale_changes(start, 32)
                    for i, st in ch:
                        s.set_marked(i, st)
                        self._stale_dirty = True
                    if not start and self._stale_dirty:     # a whole scan: one list
                        self._stale_dirty = False
                        await self._pub_stale()
            except OSError:
                pass    # link lost: the reconnect republishes everything
            except Exception as e:
                _log("publisher: %r" % (e,))

    def update(self, what="modified"):
        """`server v3 update all|modified`: full republish, or pending changes now."""
        if what == "all":
            self._sendall = True
            w = self._full_t + _FULL_MIN_S - metrics.uptime()
            if w > 0:
                return "Update (all) scheduled in %d s (at most one per %d s)" % (w, _FULL_MIN_S)
        elif self.sched is not None:
            self.sched.flush()
        return "Update (%s) scheduled" % what

    # ---- incoming ---------------------------------------------------------------------

    def _on_msg(self, topic, msg, retained, qos=0, dup=False):
        pb = self._pb
        if not topic.startswith(pb):
            if topic == self._hab and msg == b"online" and not retained:
                self._ha_force = True       # Home Assistant (re)started: announce again
            return
        rest = topic[len(pb):]
        try:
            if rest == b"status":
                # the Home Assistant OVMS integration's retained online/offline (its will
                # says offline): a viewer while online, without the 120-s expiry
                self._peer("~status", b"1" if msg == b"online" else b"0", 1 << 29)
                return
            if rest.startswith(b"stale/"):
                o = self._old
                if msg and o is not None and len(o) < 256:
                    o.append(bytes(topic))
                return
            parts = rest.decode().split("/")
        except UnicodeError:
            return
        if len(parts) < 3 or parts[0] != "client" or not parts[1]:
            return
        cid = parts[1]
        kind = parts[2]
        if kind == "active" and len(parts) == 3:
            self._peer(cid, msg)
        elif retained or len(parts) != 4 or not msg:
            return
        elif kind == "command":
            self._command(cid, parts[3], msg, qos, dup)
        elif kind == "ota":
            if len(self._otaq) < _MAX_REQS:  # the host resends what is dropped
                self._otaq.append((cid, parts[3], msg))
                self._oev.set()
        elif kind == "request" and parts[3] == "metric":
            if len(self._reqs) >= _MAX_REQS:
                _log("too many metric requests: ignored one from %s" % cid)
                return
            self._reqs.append((cid, msg))
            self._rev.set()

    def _on_big(self, topic, size, retained):
        # a message too big for the receive buffer (skipped by the client): a command gets
        # an error reply, anything else is only counted and logged
        pb = self._pb
        if retained or not topic.startswith(pb):
            return
        parts = topic[len(pb):].split(b"/")
        if len(parts) == 4 and parts[0] == b"client" and parts[1] and parts[2] == b"command":
            try:
                cid = parts[1].decode()
                cmd_id = parts[3].decode()
            except UnicodeError:
                return
            self.respond(cid, cmd_id, "Error: command too long (%d bytes, max %d)"
                         % (size, self.client._rxsize))

    async def _ota(self):
        """OTA requests (ovms.ota.rx protocol), one at a time, replies on client/<cid>/ota-reply."""
        ota = rx = None         # the OTA code loads with the first request
        while True:
            await self._oev.wait()
            self._oev.clear()
            if rx is None and self._otaq:
                try:
                    from ovms import ota
                    rx = ota.receiver()
                except MemoryError as e:
                    _log("OTA: no room for the receiver: %r" % (e,))
                    self._otaq.clear()  # the host retries
                    continue
            while self._otaq:
                cid, op, msg = self._otaq.pop(0)
                try:
                    g = _ota_trust(rx, cid, op, msg)
                    while True:     # a long step (the read-back of "end") in slices
                        try:
                            next(g)
                        except StopIteration as e:
                            r = e.args[0] if e.args else None
                            break
                        await asyncio.sleep_ms(0)
                except Exception as e:  # a bad request must never stop the server
                    r = b'{"error": "%s"}' % repr(e).replace('"', "'")
                if r is not None:
                    self.client.queue(self.prefix + "client/%s/%s" % (cid, ota.REPLY), r, qos=1)
                await asyncio.sleep_ms(0)
                if rx.reboot:
                    _log("OTA: rebooting into the new version")
                    await asyncio.sleep(2)
                    import ota_boot
                    ota_boot.reset("ota")  # deliberate: never counted as a crash

    def _peer(self, cid, msg, ttl=_PEER_TTL):
        now = metrics.uptime()
        p = self.peers
        if msg in (b"", b"0"):
            if p.pop(cid, None) is None:
                return
            _event("app.disconnected")
        else:
            if cid not in p:
                if len(p) >= _MAX_PEERS:
                    old = min(p, key=p.get)
                    del p[old]
                _event("app.connected")
                if self.sched is not None:
                    self.sched.flush()   # a new viewer: send what is pending now
            p[cid] = now + ttl
        self._peers()

    def _expire(self, now):
        p = self.peers
        gone = [k for k in p if p[k] <= now]
        for k in gone:
            del p[k]
            _event("app.disconnected")
        if gone:
            self._peers()

    def _peers(self):
        n = len(self.peers)
        if self.sched is not None:
            self.sched.peers = n
        self._set("s.v3.peers", n)

    def _command(self, cid, cmd_id, msg, qos, dup):
        sec = None              # as the config says (server.v3 commands trusted|signed)
        if msg[:6] == b"!sig1 ":  # signed with the module password (ovms.v3.cmdsig)
            from ovms.v3 import cmdsig
            msg, err = cmdsig.check(cid.encode(), cmd_id.encode(), msg,
                                    config.get("password", "module"))
            if err:
                if not ((qos == 2 or dup) and err.startswith("Error: Replayed")):
                    self.respond(cid, cmd_id, err)   # (a redelivery of a run command: quiet)
                return
            sec = True
        try:
            line = msg.decode()
        except UnicodeError:
            self.respond(cid, cmd_id, "Error: command is not valid UTF-8")
            return
        try:
            from ovms import shell
            shell.submit(cid, cmd_id, line, self._reply, qos, dup, sec)
        except Exception as e:
            self.respond(cid, cmd_id, "Error: %r" % (e,))

    async def _reply(self, cid, cmd_id, text):
        if isinstance(text, str):
            if len(text) <= 1024 or self.client is None:
                self.respond(cid, cmd_id, text)     # through the outbox (bounded: 4 KB)
            else:
                await self.client.publish("%sclient/%s/response/%s" % (self.prefix, cid, cmd_id),
                                          text, qos=1)
            return
        # a long reply (shell.Out): its lines, encoded one at a time in place,
        # go out as one QoS 1 message part by part (no joined copy, no outbox size limit)
        c = self.client
        if c is None:
            return
        parts = text.lines      # chunks (lists) of lines
        first = True
        for ch in parts:
            for i in range(len(ch)):
                ch[i] = (b"" if first else b"\n") + ch[i].encode()
                first = False
        if text.full:
            parts.append(b"\n[output truncated]")
        text.lines = None
        await c.publish("%sclient/%s/response/%s" % (self.prefix, cid, cmd_id), parts, qos=1)

    def respond(self, cid, cmd_id, text):
        c = self.client
        if c is not None:
            c.queue("%sclient/%s/response/%s" % (self.prefix, cid, cmd_id), text, qos=1)

    async def _requests(self):
        while True:
            if not self._reqs:
                self._rev.clear()
                await self._rev.wait()
                continue
            cid, msg = self._reqs.pop(0)
            c = self.client
            if c is None or not c.up or not self.ready:
                continue
            try:
                pats = msg.decode().split(",")
            except UnicodeError:
                continue
            n = 0
            seen = set()
            now = metrics.uptime()
            bits = self._rq_bits
            if bits is None or now - self._rq_t >= _FULL_MIN_S:
                # a new window: an unchanged metric goes out at most once per window for
                # requests (a repeated request is answered; the value it would resend is
                # the one retained on the broker)
                self._rq_t = now
                if bits is None or len(bits) * 8 < metrics.count():
                    bits = self._rq_bits = bytearray((metrics.count() + 7) >> 3)
                else:
                    for k in range(len(bits)):
                        bits[k] = 0
            try:
                sel = []
                for p in pats:
                    p = p.strip() or "*"
                    if "*" in p:
                        it = metrics.match(p)
                    else:
                        i = metrics.find(p)
                        it = (i,) if i >= 0 else ()
                    for i in it:
                        if i in seen or not self.sched.included(i) or not metrics.defined(i):
                            continue
                        seen.add(i)
                        sel.append(i)
                seen = None
                n = len(sel)
                few = n <= _CHUNK       # a few metrics: always sent (cheap, e.g. polling)
                j = 0
                for i in sel:
                    k = i >> 3
                    if k < len(bits):
                        if not few and bits[k] & 1 << (i & 7) and not self.sched.changed(i):
                            self.coalesced += 1     # unchanged since sent in the window
                            continue
                        bits[k] |= 1 << (i & 7)
                    await self._pub_metric(i, now)
                    j += 1
                    if not j % _CHUNK:
                        await asyncio.sleep_ms(0)
                c.queue("%sclient/%s/metric/done" % (self.prefix, cid), str(n), qos=1)
                self.requests += 1
            except OSError:
                pass

    # ---- notifications and events ---------------------------------------------------

    def notify(self, type, subtype, text):
        """Queue a notification on flash (kept across outages and reboots)."""
        self.ob.put("notify/%s/%s" % (_seg(type), _seg(subtype).replace(".", "/")), text)
        self._nev.set()
        return True

    async def _notifier(self):
        while True:
            c = self.client
            h = self.ob.peek() if c is not None and c.up and self.ready else None
            if h is None:
                self._nev.clear()
                try:
                    await asyncio.wait_for_ms(self._nev.wait(), 1000)
                except asyncio.TimeoutError:
                    pass
                continue
            seq, t, p = h
            try:
                await c.publish(self.prefix + t, p, qos=1, frail=True)
            except OSError as e:
                if e.args and e.args[0] == 104:
                    self._poison(seq, t, h[2])
                await asyncio.sleep_ms(500)
                continue
            self.ob.pop(seq)
            self.notified += 1

    def _poison(self, seq, topic, payload):
        # the link dropped while notification `seq` was in flight; after _POISON such drops
        # in a row it is a message the link cannot carry (e.g. above the broker's
        # max_packet_size): kept in the held file, counted, out of the queue's way
        st = self._strike
        if st[0] != seq:
            st[0] = seq
            st[1] = 0
        st[1] += 1
        if st[1] < _POISON:
            return
        _log("notification %s set aside: the link dropped %d times while sending it"
             % (topic, st[1]))
        try:
            self.held().put(topic, payload)
        except Exception as e:
            _log("cannot keep the set-aside notification: %r" % (e,))
        self.ob.pop(seq)

    def held(self):
        """Outbox of notifications set aside (the link could not carry them), kept on flash."""
        h = self._held
        if h is None:
            h = self._held = Outbox(self.ob.path + ".held", max_items=8, max_bytes=8192)
        return h

    def event(self, name):
        """Publish event/<name path> (and the legacy event topic) if connected.
        network.up also ends a reconnect backoff at once."""
        c = self.client
        if name == "network.up" and c is not None and not c.up:
            c.kick()
        if c is None or not c.up or name.startswith("ticker.") or name.startswith("clock."):
            return False
        c.queue(self.prefix + "event/" + _seg(name).replace(".", "/"), "")
        if _cfg("events.legacy_topic"):
            c.queue(self.prefix + "event", name)
        return True

    # ---- status -----------------------------------------------------------------------

    def status(self):
        c = self.client
        r = ["State: %s" % self.state]
        if c is not None:
            r.append("Server: %s://%s:%d as %s" % ("mqtts" if c.ssl else "mqtt", c.server,
                                                 c.port, c.client_id.decode()))
            r.append("Prefix: %s" % self.prefix)
            r.append("Traffic: tx %d B, rx %d B (MQTT); connects %d, reconnects %d"
                     % (c.tx_bytes, c.rx_bytes, c.connects, c.reconnects))
            if c.keepalive != c.ka_want:
                r.append("Keepalive: %d s (the broker refused %d s)" % (c.keepalive, c.ka_want))
            if c.last_error:
                r.append("Last error: %s" % c.last_error)
            r.append("Queued: %d message(s), %d dropped" % (c.queued(), c.dropped))
            if c.skipped:
                r.append("Skipped: %d oversized incoming message(s)" % c.skipped)
        if self.sched is not None:
            r.append("Metrics: %d published, %d pending, interval %d s"
                     % (self.published, self.sched.pending(), self.sched.interval()))
        if self.requests:
            r.append("Requests: %d served, %d values not resent (at most once per %d s)"
                     % (self.requests, self.coalesced, _FULL_MIN_S))
        r.append("Notifications: %d waiting, %d sent, %d dropped"
                 % (len(self.ob), self.notified, self.ob.dropped))
        h = self.held() if self._held or _exists(self.ob.path + ".held") else None
        if h is not None and (len(h) or h.dropped):
            r.append("Set aside: %d notification(s) the link could not carry (%s)"
                     % (len(h) + h.dropped, h.path))
        r.append("Peers: %d" % len(self.peers))
        if self.ha[0] or self.ha[1]:
            r.append("Home Assistant discovery: %d entities announced (%d B), %d removed"
                     % (self.ha[0], self.ha[2], self.ha[1]))
        return "\n".join(r)


def _exists(p):
    import os
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _ota_trust(rx, cid, op, msg):
    # A generator (the receiver's steps): OTA requests follow the command trust rules: a
    # signed request (as a signed command, with command id "ota/<op>") may do anything; with
    # server.v3 commands signed, the state-changing operations begin, abort and reboot must be
    # signed.
    signed = False
    if msg[:6] == b"!sig1 ":
        from ovms.v3 import cmdsig
        msg, err = cmdsig.check(cid.encode(), b"ota/" + op.encode(), msg,
                                config.get("password", "module"))
        if err:
            return _ota_err(op, err)
        signed = True
    elif op in ("begin", "abort", "reboot") and _cfg("commands") == "signed":
        return _ota_err(op, "signed request required (server.v3 commands signed)")
    return (yield from rx.steps(op, msg, cid, signed))


def _ota_err(op, err):
    import json
    return json.dumps({"op": op, "error": err}).encode()


def _seg(s):
    s = str(s)
    for ch in "+#\0":
        s = s.replace(ch, "_")
    return s.strip("/") or "_"


def _log(msg):
    print("server.v3:", msg)


def _event(name):
    try:
        from ovms import events
        events.raise_event(name)
    except Exception:
        pass


# ---- module API (one server per device) ---------------------------------------------

_srv = None
_task = None


def server():
    """The running Server, or None."""
    return _srv


def start(outbox=None):
    """Start the server task (idempotent) and install the shell hooks; returns the Server."""
    global _srv, _task
    if _srv is None or _task is None or _task.done():
        _srv = Server(outbox)
        _task = asyncio.create_task(_srv.run())
        import ovms
        ovms.hooks["server_status"] = status
        ovms.hooks["server_update"] = _update
    return _srv


async def stop():
    """Stop the server: publish connected=no, DISCONNECT, close, end the task. Works from
    the running loop and from a new one (the goodbye is written without the loop)."""
    global _srv, _task
    s, t = _srv, _task
    _srv = _task = None
    if s is not None:
        s.goodbye()
        await asyncio.sleep_ms(0)
    if t is not None and not t.done():
        t.cancel()
        await asyncio.sleep_ms(0)


def _update(what="modified"):
    return _srv.update(what)


def notify(type, subtype, text):
    """Queue a notification (works before start(): it waits on flash)."""
    global _srv
    if _srv is None:
        _srv = Server()
    return _srv.notify(type, subtype, text)


def event(name):
    return _srv.event(name) if _srv is not None else False


def alive(ms=5000):
    """Liveness for a watchdog: the server task runs and, with a link configured, its
    publisher loop turned within `ms` (it turns every 250 ms, connected or not)."""
    if _task is None or _task.done():
        return False
    s = _srv
    return s is None or s.client is None or ticks_diff(ticks_ms(), s.beat) < ms


def status():
    return _srv.status() if _srv is not None else "State: stopped"


def kick():
    """Reconnect at once (e.g. when the network came back)."""
    if _srv is not None and _srv.client is not None:
        _srv.client.kick()
