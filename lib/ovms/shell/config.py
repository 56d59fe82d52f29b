"""Shell commands: config list|get|set|rm (secrets are write-only: never shown)."""
from ovms import shell

_MASK = "********"


def _c():
    from ovms import config
    return config


def _secret(c, p, i):
    try:
        return bool(c.secret(p, i))
    except Exception:
        return True     # when in doubt, do not show


def _show(c, p, i):
    # value for display; secrets masked
    if _secret(c, p, i):
        v = c.get(p, i, None)
        return _MASK if v else ""
    d = getattr(c, "display", None)
    if d:
        return d(p, i)
    v = c.get(p, i, None)
    return "" if v is None else (("yes" if v else "no") if isinstance(v, bool) else str(v))


def _known(c, p):
    try:
        return p in c.params()
    except Exception:
        return False


def _insts(c, p):
    r = list(c.instances(p))
    k = getattr(c, "known", None)
    if k:
        for i in k(p):
            if i not in r:
                r.append(i)
    r.sort()
    return r


def _list(session, args):
    c = _c()
    o = shell.Out(session)
    if not args:
        for p in c.params():
            r = getattr(c, "readable", None)
            if not o.add("%s (%s)" % (p, "readable writeable" if r is None or r(p) else "writeable")):
                break
        return o.text()
    p = args[0]
    if not _known(c, p):
        return "Error: Unknown parameter '%s'" % p
    r = getattr(c, "readable", None)
    o.add("%s (%s)" % (p, "readable writeable" if r is None or r(p) else "writeable"))
    for i in _insts(c, p):
        if not o.add("  %s: %s" % (i, _show(c, p, i))):
            break
    return o.text()


def _get(session, args):
    c = _c()
    p, i = args
    if not _known(c, p):
        return "Error: Unknown parameter '%s'" % p
    if _secret(c, p, i):
        return "Error: %s %s is write-only (secret)" % (p, i)
    v = _show(c, p, i)
    return v if v != "" else "(not set)"


def _scrub(msg, value):
    # never echo a secret value back inside an error message
    if value and len(value) > 0:
        msg = msg.replace(value, _MASK)
    return msg


# Over the network (an MQTT session), a change of where the module logs in (server, port, user,
# CA) or a switch to plain MQTT would send the stored MQTT password to a host the sender
# chooses: such a change clears the stored password first (it must be given anew).
_LINK = ("server", "port", "user", "ca", "tls")
_CLEARED = "\nThe stored MQTT password was cleared (the link changed): set it anew " \
           "(config set password server.v3 <password>)."


def _relink(c, session, p, i, v):
    # True if this remote change moves the broker link: the stored password is cleared first
    if (not getattr(session, "remote", False) or p != "server.v3"
            or (i not in _LINK and i != "*") or not c.get("password", "server.v3", None)):
        return False
    if v is not None:
        v = c.check(p, i, v)    # an invalid value: refused before anything changes
        old = c.get(p, i, None)
        if i == "tls":
            if v == "yes" or not old:
                return False    # TLS on, or already off
        elif v == ("" if old is None else str(old)):
            return False
    c.rm("password", "server.v3")
    return True


def _set(session, args):
    c = _c()
    p, i = args[0], args[1]
    v = " ".join(args[2:])
    try:
        cl = _relink(c, session, p, i, v)
        c.set(p, i, v)
    except (ValueError, TypeError) as e:
        m = str(e) or "invalid value"
        if _secret(c, p, i):
            m = _scrub(m, v)
        return "Error: " + m
    except OSError as e:
        return "Error: Could not save config (%r)" % (e,)
    return "Parameter has been set." + (_CLEARED if cl else "")


def _rm(session, args):
    c = _c()
    p, i = args
    if not _known(c, p):
        return "Error: Unknown parameter '%s'" % p
    try:
        cl = (i == "*" or c.is_set(p, i)) and _relink(c, session, p, i, None)
        ok = c.rm(p, i)
    except (ValueError, TypeError) as e:
        return "Error: %s" % e
    except OSError as e:
        return "Error: Could not save config (%r)" % (e,)
    if not ok:
        return "Error: Parameter %s %s is not set" % (p, i)
    return "Parameter has been removed." + (_CLEARED if cl else "")


shell.register("config", "Configuration framework", None)
shell.register("config list", "Show parameters, or the instances of one (secrets masked)",
               _list, "[<param>]", 0, 1, False)
shell.register("config get", "Show one value (not for secrets)", _get, "<param> <instance>", 2, 2, False)
shell.register("config set", "Set a value", _set, "<param> <instance> <value>", 3, -1, True)
shell.register("config rm", "Remove a value (instance * = all)", _rm, "<param> <instance>|*", 2, 2, True)
