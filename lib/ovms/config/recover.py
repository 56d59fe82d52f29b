"""Config file reading and recovery: used by ovms.config.load() at boot, then unloaded."""
from micropython import const

from ovms import config as c
from ovms.config import _MAGIC, _crc, path, _exists, _remove
from ovms.fsutil import replace as _replace
from ovms.config.schema import check

_MAX_LINES = const(512)
_MAX_CORRUPT = const(3)


def _unesc(s):
    if "\\" not in s:
        return s
    r = []
    k = 0
    n = len(s)
    while k < n:
        c = s[k]
        if c == "\\" and k + 1 < n:
            k += 1
            c = s[k]
            c = "\t" if c == "t" else "\n" if c == "n" else "\r" if c == "r" else c
        r.append(c)
        k += 1
    return "".join(r)


def _read(fn):
    # -> (data, gen); OSError if it cannot be opened, ValueError(reason) if damaged
    data = {}
    with open(fn, "rb") as f:
        ln = f.readline()
        if not ln.startswith(_MAGIC + b" gen=") or not ln.endswith(b"\n"):
            raise ValueError("bad header" if ln else "empty file")
        try:
            gen = int(ln[len(_MAGIC) + 5:-1])
        except ValueError:
            raise ValueError("bad header")
        c = _crc(ln, 0)
        n = 0
        while True:
            ln = f.readline()
            if not ln:
                raise ValueError("truncated: no end marker after %d entries" % n)
            if ln.startswith(b"#end "):
                e = ln.split()
                try:
                    ok = len(e) == 3 and int(e[1]) == n and int(e[2], 16) == c
                except ValueError:
                    ok = False
                if not ok or not ln.endswith(b"\n"):
                    raise ValueError("checksum mismatch")
                if f.read(1):
                    raise ValueError("data after end marker")
                return data, gen
            c = _crc(ln, c)
            n += 1
            if not ln.endswith(b"\n") or n > _MAX_LINES:
                raise ValueError("bad entry %d" % n)
            try:
                e = ln[:-1].decode().split("\t")
            except Exception:
                e = ()
            if len(e) != 3 or not e[0] or not e[1]:
                raise ValueError("bad entry %d" % n)
            p = _unesc(e[0])
            d = data.get(p)
            if d is None:
                d = data[p] = {}
            d[_unesc(e[1])] = _unesc(e[2])


def _try(fn):
    # -> (0, (data, gen)) ok | (1, None) missing | (2, reason) damaged
    try:
        return 0, _read(fn)
    except OSError as e:
        if e.args and e.args[0] == 2:  # ENOENT
            return 1, None
        return 2, "read error %r" % (e,)
    except MemoryError:
        return 2, "too large to load"
    except Exception as e:
        return 2, str(e) or repr(e)


def _aside(fn):
    dst = None
    for k in range(1, _MAX_CORRUPT + 1):
        dst = "%s.corrupt-%d" % (fn, k)
        if not _exists(dst):
            break
    try:
        _replace(fn, dst)
        return dst
    except OSError:
        _remove(fn)
        return "(deleted: could not move it)"


def run():
    """Load the newest complete config into ovms.config; returns warning strings."""
    w = []
    cfg = path()
    tmp = cfg + ".tmp"
    bak = cfg + ".bak"
    rewrite = False
    st, r = _try(cfg)
    if st == 0:
        _remove(tmp)  # a write that never reached the rename: discard
    else:
        if st == 2:
            w.append("config: %s is corrupt (%s), moved to %s" % (cfg, r, _aside(cfg)))
        st2, r2 = _try(tmp)
        if st2 == 0:  # cut between the renames: the new file is complete, finish the job
            r = r2
            try:
                _replace(tmp, cfg)
            except OSError as e:
                w.append("config: could not rename %s: %r" % (tmp, e))
            if st == 2:
                w.append("config: using the newer complete copy %s (generation %d)" % (tmp, r[1]))
        else:
            if st2 == 2:
                _remove(tmp)
            st3, r = _try(bak)
            if st3 == 0:
                w.append("config: booting on last-good config %s (generation %d)" % (bak, r[1]))
                rewrite = True
            else:
                if st3 == 2:
                    w.append("config: last-good copy %s is corrupt too (%s)" % (bak, r))
                if st == 1 and st3 == 1:
                    w.append("config: no config in %s yet, using defaults" % c._root)
                else:
                    w.append("config: booting on defaults")
                r = ({}, 0)
    c._data, c._gen = data, gen = r
    for p in data:
        for i in data[p]:
            try:
                check(p, i, data[p][i])
            except ValueError as e:
                w.append("config: stored %s %s ignored, default used: %s"
                         % (p, i, "invalid secret" if c.secret(p, i) else e))
    if rewrite:
        try:
            c._save()
        except Exception as e:
            w.append("config: could not rewrite %s: %r" % (cfg, e))
    return w
