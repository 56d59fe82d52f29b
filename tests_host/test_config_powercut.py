"""Power cuts during config writes: the module always boots with a valid config."""
import os
import random
import signal
import subprocess
import time

from util import MICROPYTHON, compiled_lib, run_mpy

# Generation g of the test config: every value depends on g, lengths vary so file sizes differ.
GEN_CODE = """
def values(g):
    r = [('usr', 'gen', str(g)), ('vehicle', 'id', 'V%d' % g), ('server.v3', 'port', str(1000 + g))]
    for k in range(6):
        r.append(('usr', 'k%d' % k, ('%d.%d;' % (g, k)) * (1 + (g * 7 + k) % 23)))
    if g % 3 == 0:
        r.append(('wifi.ssid', 'net %d' % g, 'pw%d' % g))
    return r

def consistent(config):
    # -> the generation the loaded config holds, or raise AssertionError
    g = int(config.get('usr', 'gen', '0'))
    if g == 0:
        assert config.instances('usr') == [] and config.instances('vehicle') == [], 'partial gen 0'
        return 0
    want = values(g)
    for p, i, v in want:
        got = config.get(p, i)
        assert str(got) == v, 'gen %d: %s %s = %r, want %r' % (g, p, i, got, v)
    ssids = [i for p, i, v in want if p == 'wifi.ssid']
    assert config.instances('wifi.ssid') == ssids, 'gen %d: ssids %r' % (g, config.instances('wifi.ssid'))
    return g

def write(config, g):
    old = ['net %d' % i for i in (g - 1, g - 2, g - 3) if i % 3 == 0]
    config.update(values(g) + [('wifi.ssid', s, None) for s in old])
"""

WRITER = GEN_CODE + """
import sys
from ovms import config
w = config.init(sys.argv[1])
for m in w:
    print('WARN', m)
try:
    g = consistent(config)
except AssertionError as e:
    print('BAD', e)
    sys.exit(3)
print('LOADED', g)
while True:
    g += 1
    write(config, g)
    print('DONE', g)
"""


def _state(root):
    try:
        names = set(os.listdir(root))
    except FileNotFoundError:  # cut before the first write created the directory
        return "no-dir"
    if "ovms.cfg.tmp" in names:
        return "tmp-and-main" if "ovms.cfg" in names else "tmp-without-main"
    return "clean" if "ovms.cfg" in names else "no-main"


def _until_written(p, writes, timeout=60):
    """What the writer printed until it loaded the config and completed `writes` more writes
    (or stopped). Start-up and write times depend on the machine's load, so the random cut is
    timed from here, counted in writes rather than in seconds."""
    import select
    fd, out = p.stdout.fileno(), b""
    end = time.monotonic() + timeout
    while b"BAD" not in out:
        lines = out.split(b"\n")[:-1]
        if any(x.startswith(b"LOADED") for x in lines) and \
                sum(x.startswith(b"DONE") for x in lines) >= writes:
            break
        left = end - time.monotonic()
        assert left > 0, "writer did not get going: %r" % out
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 4096)
            if not data:
                break
            out += data
    return out


def test_sigkill_at_random_moments_during_writes(tmp_path):
    """Kill the writing process (SIGKILL = power cut for the file system's view) 60 times at
    random moments; every restart must load a complete generation, never older than the last
    write that returned and never newer than the one in flight."""
    root = tmp_path / "store"
    script = tmp_path / "writer.py"
    script.write_text("import sys\nsys.path[:0] = [%r]\n" % compiled_lib() + WRITER)
    rnd = random.Random(1234)
    last_done = 0
    states = {}
    total_writes = 0
    kills = 60
    for n in range(kills):
        p = subprocess.Popen([MICROPYTHON, "-X", "heapsize=100K", str(script), str(root)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # 3 of 4 cuts land in the write loop (after 0-3 completed writes, then 0-30 ms into
        # the next), however slow the machine is; the 4th at a random moment from the power-on
        # (start-up, load, leftover repair, or writing)
        if n % 4:
            head = _until_written(p, rnd.randint(0, 3))
            time.sleep(rnd.uniform(0, 0.03))
        else:
            head = b""
            time.sleep(rnd.uniform(0.01, 0.12))
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        out, err = (head + out).decode(), err.decode()
        assert "BAD" not in out and "Traceback" not in err, (out, err)
        lines = out.split("\n")[:-1]  # complete lines only: the cut may land mid-print
        warns = [x for x in lines if x.startswith("WARN")]
        # crash leftovers are repaired silently: never a corrupt file, never a fallback
        assert not [w for w in warns if "no config" not in w], warns
        loaded = [int(x.split()[1]) for x in lines if x.startswith("LOADED")]
        if loaded:
            assert last_done <= loaded[0] <= last_done + 1, (loaded, last_done)
            done = [int(x.split()[1]) for x in lines if x.startswith("DONE")]
            total_writes += len(done)
            if done:
                last_done = done[-1]
            else:
                last_done = loaded[0]
        states[_state(root)] = states.get(_state(root), 0) + 1
    # a fresh boot after the last cut
    r = run_mpy(GEN_CODE + "from ovms import config\nw = config.init(%r)\nprint(w)\nprint(consistent(config))\n"
                % str(root), path=(compiled_lib(),))
    w, g = r.stdout.splitlines()
    assert w == "[]"
    assert last_done <= int(g) <= last_done + 1
    assert total_writes > kills  # the cuts really landed while writing
    print("power cuts: %d, writes completed: %d, state at the cut: %s" % (kills, total_writes, states))


CRASH_CODE = GEN_CODE + """
import os as real_os
from ovms import config, fsutil           # (config's renames are fsutil's)

class Cut(Exception):
    pass

class FakeOS:
    # os with a power cut before rename number `at` (1 = main -> .bak, 2 = .tmp -> main)
    def __init__(self, at):
        self.at, self.n = at, 0
    def rename(self, a, b):
        self.n += 1
        if self.n == self.at:
            raise Cut()
        real_os.rename(a, b)
    def __getattr__(self, k):
        return getattr(real_os, k)

class CutFile:
    # a file whose writes stop after `budget` bytes (the rest never reaches the flash)
    def __init__(self, f, budget):
        self.f, self.budget = f, budget
    def write(self, b):
        if len(b) > self.budget:
            self.f.write(b[:self.budget])
            self.f.close()
            raise Cut()
        self.budget -= len(b)
        return self.f.write(b)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()

def cut_write(budget):
    def o(fn, mode='r'):
        return CutFile(open(fn, mode), budget)
    return o

root = ROOT
results = []
g = 0
cases = [('rename', 1), ('rename', 2), ('rename', 3)] + [('bytes', b) for b in BUDGETS]
for kind, arg in cases:
    assert config.init(root) == [] or g == 0
    g0 = consistent(config)
    if kind == 'rename':
        fsutil.os = FakeOS(arg)
    else:
        config.open = cut_write(arg)
    try:
        write(config, g0 + 1)
        completed = True
    except Cut:
        completed = False
    if kind == 'rename':
        fsutil.os = real_os
    else:
        del config.open
    w = config.init(root)                 # reboot
    g1 = consistent(config)
    results.append((kind, arg, completed, g0, g1, w, sorted(real_os.listdir(root))))
    # a write after the reboot works and is clean
    g = g1 + 1
    write(config, g)
    assert config.init(root) == [] and consistent(config) == g
print(repr(results))
"""


def test_cut_at_every_step_of_a_write(tmp_path):
    """Deterministic cuts: before each rename and after every few bytes of the temp file."""
    root = tmp_path / "store"
    run_mpy(GEN_CODE + "from ovms import config\nconfig.init(%r)\nwrite(config, 1)\nwrite(config, 2)" % str(root),
            path=(compiled_lib(),))
    size = len((root / "ovms.cfg").read_bytes())
    budgets = sorted(set([0, 1, 10, 20, 21, 22, 40] + list(range(50, size + 200, 37))))
    code = CRASH_CODE.replace("ROOT", repr(str(root))).replace("BUDGETS", repr(budgets))
    r = run_mpy(code, path=(compiled_lib(),))
    results = eval(r.stdout.strip().splitlines()[-1])
    assert len(results) == 3 + len(budgets)
    for kind, arg, completed, g0, g1, w, names in results:
        # the config is never lost: either the old or the new generation, and the new one
        # whenever the write returned
        assert g1 in (g0, g0 + 1), (kind, arg, g0, g1)
        if completed:
            assert g1 == g0 + 1
        # crash leftovers are repaired at boot without any warning (nothing was corrupt)
        assert w == [], (kind, arg, w)
        assert names == ["ovms.cfg", "ovms.cfg.bak"], (kind, arg, names)
    by = {(k, a): (c, g0, g1) for k, a, c, g0, g1, w, n in results}
    # cut before main -> .bak: old generation; between the two renames: the complete new one
    assert by[("rename", 1)][2] == by[("rename", 1)][1]
    assert by[("rename", 2)][2] == by[("rename", 2)][1] + 1
    assert by[("rename", 3)][0] is True
    # a temp file cut short is never used
    assert all(g1 == g0 for (k, a), (c, g0, g1) in by.items() if k == "bytes" and not c)
