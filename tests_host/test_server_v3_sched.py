"""Delta publishing rules (ovms.v3.sched) on the micropython binary with a simulated clock."""
from test_mqtt_kit import build_lib
from util import run_mpy

PRE = r'''
from ovms import metrics
import time
T = [time.ticks_ms()]
metrics._ms = lambda: T[0] & 0x3FFFFFFF
metrics._up_last = metrics._ms()
from ovms.v3.sched import Scheduler
s = Scheduler((5, 10, 10, 60, 600))
def now():
    return metrics.uptime()
def step(ms=250):
    T[0] += ms
    s.collect()
    out = s.due(now())
    for i in out:
        s.sent(i, now())
    return [metrics.name(i) for i in out]
def run(seconds, fn=None):
    log = []
    for k in range(int(seconds * 4)):
        if fn:
            fn(k)
        for n in step():
            log.append((T[0], n, metrics.text(n)))
    return log
for i in s.all():
    s.sent(i, now())
'''


def mpy(code):
    r = run_mpy(PRE + code, path=(build_lib(),))
    return [eval(x) for x in r.stdout.strip().split("\n")]


def test_default_policies_by_unit_name_and_type():
    out = mpy("""
metrics.define("xzz.wheel", "f", "km/h")
metrics.define("xzz.flag", "b")
metrics.configure("v.b.voltage", deadband=2.0, min_interval=30)
metrics.configure("v.b.current", deadband=1e-9)
s.resize()
for n in ("v.b.soc", "v.p.speed", "v.b.c.voltage", "m.freeram", "m.net.wifi.sq", "xzz.wheel",
          "xzz.flag", "v.e.locked", "v.c.state", "v.p.latitude", "v.b.12v.voltage",
          "v.b.voltage", "v.b.current"):
    print(repr((n, s.policy(metrics.find(n)))))
""")
    got = dict(out)
    assert got == {
        "v.b.soc": (0.5, 0), "v.p.speed": (1.0, 0), "v.b.c.voltage": (0.0, 60),
        "m.freeram": (0.0, 3600), "m.net.wifi.sq": (1.0, 0), "xzz.wheel": (1.0, 60),
        "xzz.flag": (0.0, 0), "v.e.locked": (0.0, 0), "v.c.state": (0.0, 0),
        "v.p.latitude": (0.0001, 0), "v.b.12v.voltage": (0.1, 0),
        "v.b.voltage": (2.0, 30),                 # explicit policy wins
        "v.b.current": (1e-9, 0)}                 # "every change"


def test_rate_limit_and_latency_bound_with_continuous_changes():
    """A value changing every 250 ms while the car is on: published at most every 5 s, and
    no change waits longer than 5 s (+1 s clock granularity)."""
    out = mpy("""
metrics.set("v.e.on", True)
T[0] += 6000
step()
vals = []      # change times (small ints: records of boxed floats fragmented the test's heap)
def change(k):
    metrics.set("v.b.current", 100.0 + k)   # 1 A per step: beyond the 0.5 A deadband
    vals.append(T[0])
log = run(60, change)
ts = [t for t, n, v in log if n == "v.b.current"]
print(repr([b - a for a, b in zip(ts, ts[1:])]))
# latency: for each change, time until a publication carries it or a later value
worst = 0
for t in vals:
    later = [tt for tt in ts if tt >= t]
    if later:
        worst = max(worst, later[0] - t)
print(repr(worst))
print(repr(len(ts)))
""")
    gaps, worst, n = out
    assert all(g >= 5000 - 1000 for g in gaps), gaps
    assert worst <= 6000, worst
    assert 10 <= n <= 13


def test_deadband_filters_noise_but_drift_adds_up():
    out = mpy("""
metrics.set("v.e.on", True)
metrics.set("v.b.soc", 50.0)
T[0] += 6000
step()
log = run(30, lambda k: metrics.set("v.b.soc", 50.0 + (0.2 if k % 2 else -0.2)))
print(repr([v for t, n, v in log if n == "v.b.soc"]))
log = run(30, lambda k: metrics.set("v.b.soc", 50.0 + 0.02 * k))
print(repr([v for t, n, v in log if n == "v.b.soc"]))
""")
    noise, drift = out
    assert noise == []                     # +-0.2 % around the published 50 %: nothing
    assert len(drift) >= 2                 # 0.02 % per step: 0.5 % steps go out
    assert all(abs(float(b) - float(a)) >= 0.5 for a, b in zip(["50"] + drift, drift))


def test_priority_is_immediate_and_longer_interval_flushes():
    out = mpy("""
metrics.set("v.e.on", True)
metrics.set("v.e.locked", False)
metrics.set("v.p.speed", 50.0)
T[0] += 6000
step()
T[0] += 6000
step()
metrics.set("v.p.speed", 60.0)
print(repr(step()))                 # quiet for 6 s: goes out at once
metrics.set("v.p.speed", 70.0)
print(repr(step()))                 # within 5 s of the last one: waits
metrics.set("v.e.locked", True)
print(repr(step()))                 # priority: at once
metrics.set("v.e.on", False)        # parked: interval 5 s -> 60 s (awake) / 600 s
print(repr(sorted(step())))         # pending 70 km/h flushed with the state change
""")
    assert out[0] == ["v.p.speed"]
    assert out[1] == []
    assert out[2] == ["v.e.locked"]
    assert "v.p.speed" in out[3] and "v.e.on" in out[3]


def test_full_republish_list_and_stale_changes():
    out = mpy("""
metrics.define("xzz.fast", "f", "V", stale=10)
metrics.set("xzz.fast", 1.0)
metrics.set("v.b.soc", 80.0)
full = [metrics.name(i) for i in s.all()]
print(repr(("xzz.fast" in full, "v.b.soc" in full, "v.b.range.est" in full)))
print(repr(s.pending()))
for i in s.all():
    s.sent(i, now())
T[0] += 11000
ch, nxt = s.stale_changes(0, s.n)
print(repr([(metrics.name(i), st) for i, st in ch]))
for i, st in ch:
    s.set_marked(i, st)
metrics.set("xzz.fast", 2.0)
ch, nxt = s.stale_changes(0, s.n)
print(repr([(metrics.name(i), st) for i, st in ch]))
""")
    assert out[0] == (True, True, False)
    assert out[1] == 0
    assert ("xzz.fast", True) in out[2]
    assert out[3] == [("xzz.fast", False)]
