"""Shell commands: metrics list|get|set."""
from ovms import shell


def _m():
    from ovms import metrics
    return metrics


def _val(m, i):
    t = m.text(i)
    if t == "" and not m.defined(i):
        return ""
    return t + m.unit(i)


def _list(session, args):
    m = _m()
    every = False
    f = ""
    for a in args:
        if a == "-a":
            every = True
        elif f:
            return "Usage: metrics list [-a] [<filter>]"
        else:
            f = a
    while f.endswith("*"):
        f = f[:-1]
    o = shell.Out(session)
    hit = 0
    for i in range(m.count()):
        n = m.name(i)
        if f and f not in n:
            continue
        hit += 1
        d = m.defined(i)
        if not d and not every:
            continue
        a = m.age(i) if d else None
        a = "%6ds%s" % (a, "S" if m.stale(i) else " ") if a is not None else "        "
        if not o.add("%-40s [%s] %s" % (n, a, _val(m, i))):
            break
    if not hit:
        return "Unrecognised metric name"
    if not o.lines and not o.full:
        return "No values yet (%d metrics match; metrics list -a shows them)" % hit
    return o.text()


def _find(m, name):
    i = m.find(name)
    return i if i is not None and i >= 0 else -1


def _get(session, args):
    m = _m()
    i = _find(m, args[0])
    if i < 0:
        return "Error: Unrecognised metric name"
    if not m.defined(i):
        return "(undefined)"
    return _val(m, i) or '""'


def _set(session, args):
    m = _m()
    i = _find(m, args[0])
    if i < 0:
        return "Error: Unrecognised metric name"
    try:
        m.set(i, " ".join(args[1:]))    # the metric table parses text by the metric's type
    except (ValueError, TypeError) as e:
        return "Error: Metric could not be set: %s" % (e,)
    return "Metric set"


shell.register("metrics", "Metrics framework", None)
shell.register("metrics list", "Show metrics with values: name [age, S = stale] value (-a: all)",
               _list, "[-a] [<filter>]", 0, 2, False)
shell.register("metrics get", "Show one metric value", _get, "<metric>", 1, 1, False)
shell.register("metrics set", "Set a metric value", _set, "<metric> <value>", 2, -1, True)
