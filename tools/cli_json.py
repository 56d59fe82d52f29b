"""cli_json: shell replies as data for `ovms.py --json` (metrics list/get, config list/get)."""
import re

_METRIC = re.compile(r"^(\S+)\s+\[\s*(?:(\d+)s([S ]?))?\s*\] ?(.*)$")
_PARAM = re.compile(r"^(\S+) \((readable writeable|writeable)\)$")
TRUNC = "[output truncated]"


def metrics_list(text):
    """[{name, age, stale, value}] from `metrics list` (value: the text shown, unit included)."""
    out = []
    for ln in text.splitlines():
        m = _METRIC.match(ln)
        if m:
            out.append({"name": m.group(1), "age": int(m.group(2)) if m.group(2) else None,
                        "stale": m.group(3) == "S", "value": m.group(4)})
    return out


def config_list(text):
    """{param: {"readable": bool, "values": {instance: value}}} from `config list [param]`."""
    out = {}
    cur = None
    for ln in text.splitlines():
        m = _PARAM.match(ln)
        if m:
            cur = out[m.group(1)] = {"readable": m.group(2) != "writeable", "values": {}}
        elif cur is not None and ln.startswith("  "):
            k, _, v = ln[2:].partition(": ")
            cur["values"][k] = v
    return out


def reply(line, text):
    """The JSON object printed for one command: command, ok, truncated, reply, and data
    where the command's reply is data."""
    from cli_mqtt import failed
    w = line.split()
    ok = not failed(text)
    r = {"command": line, "ok": ok, "truncated": text.rstrip().endswith(TRUNC), "reply": text}
    if ok and len(w) >= 2:
        k = (w[0], w[1])
        if k == ("metrics", "list"):
            r["data"] = metrics_list(text)
        elif k == ("config", "list"):
            r["data"] = config_list(text)
        elif k in (("metrics", "get"), ("config", "get")):
            r["data"] = None if text in ("(undefined)", "(not set)") else text
    return r
