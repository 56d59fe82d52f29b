"""Config saves off the command path: with the ESP32 flash's costs (tools/vboard/flash.py), a
`config set` in the running app returns at once, the app's saver task writes it soon after in
steps (the loop runs between them), and a reset or stop in between still writes it."""
import os

from util import TOOLS, run_mpy, compiled_lib

PRE = """
import sys, time, asyncio
sys.path.append(%r)
import os, flash
sys.path.pop()
flash.install(os, %r)
from ovms import config, app
STORE = %r
config.init(STORE)
""" % (os.path.join(TOOLS, "vboard"), "{store}", "{store}")

RUN = PRE + """
worst = [0]
async def monitor():
    while True:
        t = time.ticks_us()
        await asyncio.sleep_ms(1)
        worst[0] = max(worst[0], time.ticks_diff(time.ticks_us(), t) - 1000)

async def main():
    asyncio.create_task(app._config_saver())
    asyncio.create_task(monitor())
    await asyncio.sleep_ms(50)
    slow = 0
    g0 = config._gen
    for i in range(6):
        t = time.ticks_us()
        config.set("usr", "k%d" % i, str(i))           # what `config set` does
        slow = max(slow, time.ticks_diff(time.ticks_us(), t))
        await asyncio.sleep_ms(400)
    print("SAVED_SOON", config._gen - g0)
    await asyncio.sleep_ms(5000)
    print("SET_US", slow, "WORST_US", worst[0], "DIRTY", config._dirty, "SAVES", config._gen - g0)
asyncio.run(main())
config.init(STORE)
print("READ", [config.get("usr", "k%d" % i) for i in range(6)])
"""


def test_config_set_returns_at_once_and_the_saver_writes_it(tmp_path):
    store = str(tmp_path / "store")
    out = run_mpy(RUN.replace("{store}", store), heap="256K",
                  path=(compiled_lib(),)).stdout
    words = out.split()
    set_us = int(words[words.index("SET_US") + 1])
    worst = int(words[words.index("WORST_US") + 1])
    print(out)
    assert set_us < 10000, out          # was ~50 ms: tmp write + close + two renames
    assert "DIRTY False" in out
    assert "SAVED_SOON 1" in out, out   # the first change is written at once (0.1 s) ...
    assert "SAVES 2" in out, out        # ... the five that follow within 5 s in one more save
    assert "READ ['0', '1', '2', '3', '4', '5']" in out
    assert worst < 80000, out           # one flash write (45-ms erase) at a time, never the whole save (~97 ms)


def test_a_deferred_change_is_written_before_a_reset_and_at_stop(tmp_path):
    store = str(tmp_path / "store")
    code = PRE.replace("{store}", store) + """
config._later = lambda: None      # the app's saver has not run yet
config.set("usr", "a", "1")
print("PENDING", config._dirty)
import ota_boot
class M:
    def reset(self):
        raise SystemExit(0)
sys.modules["machine"] = M()
try:
    ota_boot.ROOT = %r
    ota_boot.reset("reset")
except SystemExit:
    pass
config._later = None
config.init(%r)
print("AFTER", config.get("usr", "a"))
""" % (str(tmp_path), store)
    os.makedirs(str(tmp_path / "store"), exist_ok=True)
    out = run_mpy(code, heap="256K", path=(compiled_lib(),)).stdout
    assert "PENDING True" in out and "AFTER 1" in out, out
