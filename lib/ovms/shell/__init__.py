"""OVMS-style command shell: command tree, sessions with secure mode, MQTT/REPL transports."""
# Trust (see README "Security"): the console (REPL, physical access) enters secure mode with
# `enable` (password module; none set: granted, as OVMS). An MQTT command gets a session of its
# own, secure or not as the transport decides (ovms.server_v3: trusted broker link by default, or
# a valid signature with server.v3 commands signed); no secure state outlives the command, so
# nothing another sender could reuse, and `enable` over MQTT checks no password (no guessing,
# no penalty, no lock-out).
import time
from micropython import const

import ovms

MAX_LINE = const(1024)      # longest accepted command line (characters)
MAX_OUT = const(4096)       # default reply size limit (characters), then TRUNC is appended
MAX_STREAM = const(32768)   # reply limit of MQTT sessions (streamed, see Out)
PENALTY_MS = const(5000)    # delay after a wrong enable password
_DEDUP_MS = const(60000)    # window in which a repeated QoS 2 / DUP command is dropped
_DEDUP_N = const(16)
_CHUNK = const(32)          # lines per chunk of an Out
TRUNC = "\n[output truncated]"
SECURE_REQUIRED = "Error: Secure command requires 'enable' mode"
SIGN_REQUIRED = "Error: Secure command requires a signed command (server.v3 commands signed)"
READONLY = "Error: Read-only shell: this command is not allowed over MQTT"
UNRECOGNISED = "Unrecognised command"

# A node is a list: [title, handler, usage, min_args, max_args, secure, children, lazy module]
_T = const(0)
_H = const(1)
_U = const(2)
_MIN = const(3)
_MAX = const(4)
_SEC = const(5)
_CH = const(6)
_LAZY = const(7)

_root = ["", None, "", 0, 0, False, {}, None]

# Hooks the app plugs in (all optional; commands say "not available" without them):
#   can_send(bus, id, ext, data) -> truthy if queued   can_status() -> str | dict | list of pairs
#   vehicle() -> object with command_frames(name, args) (or None)
#   notify(type, subtype, text)   event(name)   tasks() -> str | list   reset()  (restart soon)
#   server_status() -> str   server_update(what) -> str (may be a coroutine)
hooks = ovms.hooks

_ms = time.ticks_ms        # clock (ms); tests may replace it
_penalty_until = None      # ticks_ms until which enable attempts are refused (global)


def hook(name, fn):
    """Install (or with fn=None remove) an app hook, see `hooks`."""
    if fn is None:
        hooks.pop(name, None)
    else:
        hooks[name] = fn


# ---- command tree -------------------------------------------------------------------

def _node(path, create):
    n = _root
    for w in path.split():
        ch = n[_CH]
        if ch is None:
            if not create:
                return None
            ch = n[_CH] = {}
        c = ch.get(w)
        if c is None:
            if not create:
                return None
            c = ch[w] = ["", None, "", 0, 0, False, None, None]
        n = c
    return n


def register(path, title, handler, usage="", min_args=0, max_args=0, secure=True):
    """Add (or replace) a command. handler(session, args: list of str) -> str; None = a group.
    max_args -1 = unlimited. usage may use $C (children joined by |)."""
    n = _node(path, True)
    n[_T] = title
    n[_H] = handler
    n[_U] = usage
    n[_MIN] = min_args
    n[_MAX] = max_args
    n[_SEC] = secure
    return n


def lazy(name, title, module):
    """Register a top-level command whose subtree is defined by importing ovms.<module>."""
    n = _node(name, True)
    if not n[_T]:
        n[_T] = title
    n[_LAZY] = module


def _resolve(n):
    m = n[_LAZY]
    if m:
        for k in (0, 1):
            n[_LAZY] = None
            try:
                __import__("ovms." + m)
                return None
            except MemoryError:
                n[_LAZY] = m
                if k:
                    return "Error: Out of memory loading the %s commands" % m
                unload()    # make room: the other command modules load again when used
            except Exception as e:
                n[_LAZY] = m
                return "Error: Command module %s failed to load: %r" % (m, e)
    return None


def unload():
    """Drop the built-in command modules to free heap; they load again on next use.
    (Commands that other modules registered under these top-level names are dropped too.)"""
    import gc
    import ovms
    for name, title, m in _BUILTIN:
        n = _root[_CH].get(name)
        if n is not None:
            n[_T] = title
            n[_H] = None
            n[_U] = ""
            n[_MIN] = n[_MAX] = 0
            n[_SEC] = False
            n[_CH] = None
            n[_LAZY] = m
        ovms.unload(m)
    gc.collect()


def _relieve():
    # after a command: if the heap is short (< 1/4 free), unload the command modules
    import gc
    f = gc.mem_free()
    if f * 4 < f + gc.mem_alloc():
        import sys
        for x in _BUILTIN:
            if "ovms." + x[2] in sys.modules:
                gc.collect()
                f = gc.mem_free()
                if f * 4 < f + gc.mem_alloc():
                    unload()
                return


def _find(ch, w):
    # -> (name, None) | (None, error text or None if not found)
    if w in ch:
        return w, None
    if not w:
        return None, None
    lw = w.lower()
    if lw in ch:
        return lw, None
    hit = None
    amb = None
    for k in ch:
        if k.startswith(lw):
            if hit is None:
                hit = k
            else:
                if amb is None:
                    amb = [hit]
                amb.append(k)
    if amb:
        amb.sort()
        return None, "Error: Ambiguous command (%s)" % ", ".join(amb)
    return hit, None


def _children(n):
    ch = n[_CH]
    if not ch:
        return ()
    k = list(ch)
    k.sort()
    return k


def _usage(path, n):
    u = n[_U]
    if "$C" in u or (not u and n[_H] is None and n[_CH]):
        u = u.replace("$C", "|".join(_children(n))) if u else "|".join(_children(n))
    return ("Usage: %s %s" % (path, u)).rstrip()


def _help(path, n, session):
    o = Out(session)
    if path:
        o.add("%s: %s" % (path, n[_T]) if n[_T] else path)
        if n[_H] is not None or not n[_CH]:
            o.add(_usage(path, n))
    for k in _children(n):
        c = n[_CH][k]
        o.add("%-20.20s %s" % (k, c[_T]))
    return o.text()


# ---- output ---------------------------------------------------------------------------

class Out:
    """Line collector bounded by the session's reply limit: add() returns False once full.
    For a streaming session (MQTT) text() returns the Out itself: the transport sends the
    lines one by one into one message instead of joining them (no second copy in RAM)."""

    def __init__(self, session=None, limit=0):
        self.lines = []     # chunks of up to _CHUNK lines: no large block needed to grow
        self.n = 0
        self.limit = limit or (session.max_out if session else MAX_OUT)
        self.full = False
        self.stream = session.stream if session else False

    def add(self, s):
        if self.full:
            return False
        self.n += len(s) + 1
        if self.n > self.limit:
            self.full = True
            return False
        for k in (0, 1):
            try:
                ls = self.lines
                if not ls or len(ls[-1]) >= _CHUNK:
                    ls.append([s])
                else:
                    ls[-1].append(s)
                return True
            except MemoryError:     # no block to grow the list: collect once, then
                if k:               # end the reply here (marked truncated)
                    self.full = True
                    return False
                import gc
                gc.collect()

    def text(self):
        # a fragmented heap may have no block for the whole reply: collect, then shorten
        if self.stream and self.lines:
            return self
        return self.join()

    def join(self):
        """The reply as one str (shortened if the heap has no block for it)."""
        ls = [x for ch in self.lines for x in ch]
        k = len(ls)
        retry = True
        while True:
            try:
                if k == len(ls) and not self.full:
                    return "\n".join(ls)
                return "\n".join(ls[:k] + [TRUNC[1:]])
            except MemoryError:
                import gc
                gc.collect()
                if k == 0:
                    raise
                if retry:
                    retry = False
                else:
                    k = k * 3 // 4


def _limit(t, m):
    if len(t) <= m:
        return t
    k = m - len(TRUNC)
    return (t[:k] if k > 0 else "") + TRUNC


# ---- sessions and secure mode -----------------------------------------------------------

class Session:
    """One shell user: secure (enable) state, expiry, read-only flag, reply limit."""

    def __init__(self, client_id=None, timeout=0, readonly=False, max_out=MAX_OUT):
        self.client_id = client_id
        self.timeout = timeout      # seconds of inactivity after which secure mode ends (0 = never)
        self.readonly = readonly    # True: secure commands and enable refused
        self.max_out = max_out
        self.stream = False         # replies may be Out objects (see Out.text)
        self.remote = False         # True: an MQTT command's session (see session_for)
        self.penalty = 0            # ms the transport should wait before replying
        self._secure = False
        self.last = _ms()           # last secure use (ticks_ms)
        self.used = self.last       # last command (ticks_ms), for dropping idle sessions

    @property
    def secure(self):
        if self._secure and self.timeout and time.ticks_diff(_ms(), self.last) > self.timeout * 1000:
            self._secure = False
        return self._secure

    @secure.setter
    def secure(self, v):
        self._secure = bool(v)
        self.last = _ms()


local = Session()   # the REPL / serial console session


def _cfg(param, inst, default):
    try:
        from ovms import config
        v = config.get(param, inst, default)
        return default if v is None else v
    except Exception:
        return default


def session_for(client_id, secure=None):
    """A new session for one MQTT command of client_id: read-only per config server.v3
    shell.readonly; secure if `secure`, or (None) if the broker link is trusted (server.v3
    commands trusted, the default); its replies stream (Out objects, up to MAX_STREAM)."""
    s = Session(client_id, readonly=bool(_cfg("server.v3", "shell.readonly", False)),
                max_out=MAX_STREAM)
    s.remote = True
    s.stream = True
    if secure is None:
        secure = _cfg("server.v3", "commands", "trusted") != "signed"
    s.secure = secure and not s.readonly
    return s


def _same(a, b):
    # constant-time comparison of two strings
    a = a.encode()
    b = b.encode()
    r = len(a) ^ len(b)
    for i in range(len(a)):
        r |= a[i] ^ b[i % len(b)] if b else 1
    return r == 0


def _enable(session, args):
    global _penalty_until
    if session.readonly:
        return READONLY
    if session.remote:      # MQTT: the transport decided; no password here
        return "Secure mode (trusted server link)" if session.secure else SIGN_REQUIRED
    now = _ms()
    if _penalty_until is not None:
        left = time.ticks_diff(_penalty_until, now)
        if left > 0:
            session.penalty = left
            return "Error: Too many attempts, wait %d s" % ((left + 999) // 1000)
        _penalty_until = None
    try:
        from ovms import config
        pw = config.get("password", "module", "")
    except Exception as e:
        return "Error: Password store unavailable (%r)" % (e,)
    pw = pw or ""
    if pw and not args:
        return "Error: Password required: enable <password>"
    if pw and not _same(args[0], pw):
        _penalty_until = time.ticks_add(now, PENALTY_MS)
        session.penalty = PENALTY_MS
        return "Error: Invalid password"
    session.secure = True
    return "Secure mode"


def _disable(session, args):
    session.secure = False
    return "Secure mode disabled"


def _helpcmd(session, args):
    return _dispatch(session, args + ["?"])


# ---- parsing and dispatch ---------------------------------------------------------------

def split(line):
    """Split a command line (UTF-8 bytes or str) into words (str); double quotes group
    words (\\" and \\\\ inside quotes). Raises ValueError on an unterminated quote.
    Works on bytes: iterating a str makes each new character a permanent qstr."""
    if isinstance(line, str):
        line = line.encode()
    out = []
    buf = bytearray()
    word = False    # inside a word
    q = False       # inside quotes
    esc = False
    for c in line:
        if q:
            if esc:
                if c != 0x22 and c != 0x5C:
                    buf.append(0x5C)
                buf.append(c)
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                q = False
            else:
                buf.append(c)
        elif c == 0x20 or c == 0x09:
            if word:
                out.append(str(buf, "utf-8"))
                buf = bytearray()
                word = False
        elif c == 0x22:
            q = True
            word = True
        else:
            buf.append(c)
            word = True
    if q:
        raise ValueError("Unterminated quote")
    if word:
        out.append(str(buf, "utf-8"))
    return out


def _dispatch(session, args):
    helpq = False
    if args[-1] == "?":
        args.pop()
        helpq = True
    n = _root
    path = []
    i = 0
    while i < len(args):
        e = _resolve(n)
        if e:
            return e
        ch = n[_CH]
        if not ch:
            break
        w = args[i]
        q = i == len(args) - 1 and len(w) > 1 and w.endswith("?")
        if q:
            w = w[:-1]
        k, err = _find(ch, w)
        if err:
            return err
        if k is None:
            if n[_H] is not None:
                break
            return UNRECOGNISED + ("\n" + _usage(" ".join(path), n) if path else "")
        path.append(k)
        n = ch[k]
        i += 1
        helpq = helpq or q
    e = _resolve(n)
    if e:
        return e
    p = " ".join(path)
    if helpq:
        return _help(p, n, session)
    h = n[_H]
    if h is None:
        return _usage(p, n) if path else UNRECOGNISED
    if n[_SEC] and not session.secure:
        return READONLY if session.readonly else (
            SIGN_REQUIRED if session.remote else SECURE_REQUIRED)
    rest = args[i:]
    if len(rest) < n[_MIN] or (n[_MAX] >= 0 and len(rest) > n[_MAX]):
        return _usage(p, n)
    if n[_SEC]:
        session.last = _ms()   # secure use keeps secure mode alive
    return h(session, rest)


def _run(line, session):
    # the line is checked and split as bytes (see split)
    if isinstance(line, str):
        line = line.encode()
    elif isinstance(line, (bytes, bytearray, memoryview)):
        if len(line) > MAX_LINE * 4:
            return "Error: Command too long (max %d characters)" % MAX_LINE
        line = bytes(line)
        try:
            str(line, "utf-8")      # checks only: the str is dropped at once
        except ValueError:      # UnicodeError (MemoryError goes up: "Out of memory")
            return "Error: Command is not valid UTF-8 text"
    else:
        return "Error: Command must be text"
    n = 0
    for c in line:
        if c & 0xC0 != 0x80:    # not a continuation byte: one more character
            n += 1
    if n > MAX_LINE:
        return "Error: Command too long (max %d characters)" % MAX_LINE
    line = line.strip()
    for c in line:
        if c < 0x20 and c != 0x09 or c == 0x7F:
            return "Error: Invalid character in command (control characters are not allowed)"
    try:
        args = split(line)
    except ValueError as e:
        return "Error: %s" % e
    if not args:
        return "Error: Empty command (type help or ?)"
    return _dispatch(session, args)


_GEN = type((lambda: (yield))())


def _exec(line, session):
    # -> reply text, or a coroutine returned by an async handler; never raises
    session.penalty = 0
    try:
        t = _run(line, session)
        if isinstance(t, _GEN):
            return t
    except MemoryError:
        t = "Error: Out of memory"
    except Exception as e:
        t = _err(e)
    try:
        t = _fix(t, session)
    except MemoryError:
        t = "Error: Out of memory (reply too large)"
    _relieve()
    return t


def _err(e):
    try:
        return "Error: %s: %s" % (type(e).__name__, e)
    except Exception:
        return "Error: command failed"


def _fix(t, session):
    if isinstance(t, Out):
        return t
    if not isinstance(t, str):
        t = "OK" if t is None else str(t)
    return _limit(t or "OK", session.max_out)


def run(line, session=None):
    """Run one command line (str or UTF-8 bytes) and return its reply text. Never raises.
    session defaults to `local` (the console). A wrong enable password sets
    session.penalty (ms) for the transport to wait; see run_async()."""
    if session is None:
        session = local
    t = _exec(line, session)
    if isinstance(t, _GEN):
        try:
            import asyncio
            asyncio.create_task(_quiet(t))
            return "Started in the background"
        except Exception as e:
            return _err(e)
    if isinstance(t, Out):
        try:
            t = t.join()
        except MemoryError:
            t = "Error: Out of memory (reply too large)"
    return t


async def _quiet(c):
    try:
        await c
    except Exception as e:
        print("shell: background command failed:", repr(e))


async def run_async(line, session=None):
    """run() for asyncio transports: awaits an async handler's result and sleeps the
    wrong-password penalty (session.penalty) without blocking other tasks. For a
    streaming session a long reply is an Out (see Out.text), not a str."""
    import asyncio
    if session is None:
        session = local
    t = await _run_async(line, session)
    if session.penalty:
        p = session.penalty
        session.penalty = 0
        await asyncio.sleep_ms(p)
    return t


async def _run_async(line, session):
    t = _exec(line, session)
    if isinstance(t, _GEN):
        try:
            t = _fix(await t, session)
        except MemoryError:
            t = "Error: Out of memory"
        except Exception as e:
            t = _err(e)
    return t


# ---- MQTT transport -------------------------------------------------------------------

MAX_RUNNING = 2       # MQTT commands running at once
CMD_TIMEOUT = 30      # seconds per MQTT command
_running = 0
_recent = []          # [(key, ticks_ms)] of recent QoS 2 / DUP commands


def submit(client_id, cmd_id, payload, reply, qos=0, dup=False, secure=None):
    """Queue an MQTT command (call from the receive path; returns at once).
    reply is `async def reply(client_id, cmd_id, text)` (publishes on
    <prefix>client/<cid>/response/<cmd_id>). A QoS 2 or DUP command already seen in the
    last 60 s is dropped (returns False). secure: see session_for()."""
    import asyncio
    if qos == 2 or dup:
        now = _ms()
        key = (client_id, cmd_id, hash(payload))
        for j in range(len(_recent) - 1, -1, -1):
            k, t = _recent[j]
            if time.ticks_diff(now, t) > _DEDUP_MS:
                _recent.pop(j)
            elif k == key:
                return False
        if len(_recent) >= _DEDUP_N:
            _recent.pop(0)
        _recent.append((key, now))
    asyncio.create_task(_job(client_id, cmd_id, payload, reply, secure))
    return True


async def _job(cid, cmd_id, payload, reply, secure=None):
    # A command runs at once; only an async one (still running after its first step) takes
    # one of the MAX_RUNNING slots, so a flood of quick commands never blocks others.
    global _running
    import asyncio
    s = session_for(cid, secure)
    t = _exec(payload, s)
    if isinstance(t, _GEN):
        if _running >= MAX_RUNNING:
            t.close()
            t = "Error: Too many commands in progress, try again later"
        else:
            _running += 1
            try:
                t = _fix(await asyncio.wait_for(t, CMD_TIMEOUT), s)
            except asyncio.TimeoutError:
                t = "Error: Command timed out after %d s" % CMD_TIMEOUT
            except MemoryError:
                t = "Error: Out of memory"
            except Exception as e:
                t = _err(e)
            finally:
                _running -= 1
    if s.penalty:           # a penalty never holds a command slot
        await asyncio.sleep_ms(s.penalty)
    try:
        await reply(cid, cmd_id, t)
    except Exception as e:
        print("shell: reply failed:", repr(e))


# ---- console ----------------------------------------------------------------------------

def repl(session=None):
    """Interactive shell on the console (input()); 'exit' or Ctrl-D leaves."""
    if session is None:
        session = local
    while True:
        try:
            line = input("OVMS# " if session.secure else "OVMS> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        s = line.strip()
        if not s:
            continue
        if s in ("exit", "quit"):
            return
        r = run(line, session)
        if r.startswith("Error: Password required"):
            try:
                pw = input("Password: ")
            except (EOFError, KeyboardInterrupt):
                pw = ""
            session.penalty = 0
            r = _fix(_enable(session, [pw]), session)
        print(r)
        if session.penalty:
            time.sleep_ms(session.penalty)
            session.penalty = 0


register("help", "Show commands (help <command> for details)", _helpcmd, "[<command>]", 0, -1, False)
register("enable", "Enter secure mode (password module)", _enable, "[<password>]", 0, 1, False)
register("disable", "Leave secure mode", _disable, "", 0, 0, False)
_BUILTIN = (
        ("metrics", "Metrics framework", "shell.metrics"),
        ("config", "Configuration framework", "shell.config"),
        ("stat", "Show vehicle status", "shell.module"),
        ("module", "Module information and control", "shell.module"),
        ("notify", "Notification framework", "shell.module"),
        ("event", "Event framework", "shell.module"),
        ("server", "Server framework", "shell.module"),
        ("can", "CAN bus framework", "shell.can"),
        ("lock", "Lock vehicle", "shell.vehicle"),
        ("unlock", "Unlock vehicle", "shell.vehicle"),
        ("climatecontrol", "Climate control", "shell.vehicle"),
        ("charge", "Charge control", "shell.vehicle"),
        ("wakeup", "Wake up the vehicle", "shell.vehicle"),
        ("homelink", "Activate a homelink button", "shell.vehicle"),
        ("ota", "OTA updates", "shell.ota"),
        ("obd", "OBD-II/UDS diagnostic requests", "poll.cmd"),
        ("location", "Locations (geofences)", "gps.cmd"),
        ("gps", "GPS receiver", "gps.cmd"))
for _n, _t, _m in _BUILTIN:
    lazy(_n, _t, _m)
del _n, _t, _m
