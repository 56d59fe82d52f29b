"""Slot selection at boot: switch to a staged app, trial boots, commit on health, automatic
rollback of unhealthy/crashing versions; each power-on is a separate micropython process."""
import json
import os
import re
import subprocess

from test_ota_helpers import (app_bundle, check_slot, device, device_cmd, flash_root, keypair,
                              lines, snapshot_config)
import cli_ota
from util import LIB


def _factory_version():
    with open(os.path.join(LIB, "ovms", "__init__.py")) as f:
        return re.search(r'VERSION = "([^"]+)"', f.read()).group(1)


def _state(root):
    with open(os.path.join(root, "ota", "state.json")) as f:
        return json.load(f)


def _stage(tmp_path, root, version, **kw):
    b = app_bundle(tmp_path, version, **kw)
    p = os.path.join(str(tmp_path), "b-%s.bin" % version)
    with open(p, "wb") as f:
        f.write(b)
    rc, out = device(root, "push", p, cli_ota.bundle_id(b), "1024")
    assert lines(out, "STAGED") == [version], out


def _boot(root, *more):
    rc, out = device(root, "boot", *more)
    return rc, out, lines(out, "BOOT")[-1].split()


def test_staged_app_switches_on_reboot_and_commits_once_healthy(tmp_path):
    root = flash_root(tmp_path)
    cfg = snapshot_config(root)
    fv = _factory_version()
    _, _, b = _boot(root)
    assert b == ["f", fv, "False"]
    _stage(tmp_path, root, "2.0.0")
    _, _, b = _boot(root)                                 # trial boot, not reported healthy
    assert b == ["a", "2.0.0", "True"]
    _, _, b = _boot(root, "healthy")                      # the trial was used up: rolled back
    assert b == ["f", fv, "False"]
    _stage(tmp_path, root, "2.0.0")
    rc, out, b = _boot(root, "healthy", "status")
    assert b == ["a", "2.0.0", "True"] and lines(out, "HEALTHY") == ["True"]
    st = json.loads(lines(out, "STATUS")[0])
    assert (st["running"], st["slot"], st["previous"], st["trial"]) == ("2.0.0", "a", "factory",
                                                                        False)
    assert _state(root)["run"] == "a" and _state(root)["prev"] == "f"
    for _ in range(2):                                    # committed: stays, no more trial
        rc, out, b = _boot(root, "healthy")
        assert b == ["a", "2.0.0", "False"] and lines(out, "HEALTHY") == ["False"]
    check_slot(root, "a", "2.0.0", keypair()[1])
    assert snapshot_config(root) == cfg


def test_unhealthy_version_is_rolled_back_on_next_boot(tmp_path):
    root = flash_root(tmp_path)
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    _stage(tmp_path, root, "3.0.0")
    _, _, b = _boot(root)                                 # trial boot, never healthy
    assert b == ["b", "3.0.0", "True"]
    rc, out, b = _boot(root, "status")
    assert b == ["a", "2.0.0", "False"]
    st = json.loads(lines(out, "STATUS")[0])
    assert st["fail"] == "3.0.0 did not report healthy: rolled back"
    assert st["staged"] is None and st["previous"] == "factory"


def test_version_crashing_at_start_is_rolled_back_automatically(tmp_path):
    root = flash_root(tmp_path)
    cfg = snapshot_config(root)
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    _stage(tmp_path, root, "6.6.6", crash=True)
    rc, out, b = _boot(root)
    assert rc == 99 and b[:2] == ["b", "-"]               # crashed, main reset the module
    assert "broken build 6.6.6" in lines(out, "CRASH")[0]
    rc, out, b = _boot(root, "healthy", "status")
    assert b == ["a", "2.0.0", "False"]
    st = json.loads(lines(out, "STATUS")[0])
    assert st["fail"].startswith("6.6.6 did not report healthy (RuntimeError: broken build 6.6.6)")
    assert snapshot_config(root) == cfg
    # the next update goes to the slot of the failed version; the committed one is kept
    _stage(tmp_path, root, "7.0.0")
    _, _, b = _boot(root, "healthy")
    assert b == ["b", "7.0.0", "True"]
    assert _state(root)["run"] == "b" and _state(root)["prev"] == "a"


def test_slots_alternate_and_previous_is_kept_until_overwritten(tmp_path):
    root = flash_root(tmp_path)
    seen = []
    for v in ("2.0.0", "3.0.0", "4.0.0"):
        _stage(tmp_path, root, v)
        _, _, b = _boot(root, "healthy")
        seen.append(b[0])
        check_slot(root, b[0], v, keypair()[1])
    assert seen == ["a", "b", "a"]
    st = _state(root)
    assert (st["run"], st["prev"]) == ("a", "b")
    check_slot(root, "b", "3.0.0", keypair()[1])


def test_committed_version_crashing_repeatedly_falls_back_to_previous(tmp_path):
    root = flash_root(tmp_path)
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    _stage(tmp_path, root, "3.0.0")
    _boot(root, "healthy")
    for i in range(2):                                    # two crashes: still on 3.0.0
        rc, out, b = _boot(root, "crash")
        assert rc == 99 and b == ["b", "3.0.0", "False"]
    rc, out, b = _boot(root, "crash")                     # third consecutive crash
    rc, out, b = _boot(root, "healthy", "status")
    assert b == ["a", "2.0.0", "False"]
    assert "3.0.0 crashed 3 times at start" in json.loads(lines(out, "STATUS")[0])["fail"]


def test_crash_counter_resets_once_healthy(tmp_path):
    root = flash_root(tmp_path)
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    _stage(tmp_path, root, "3.0.0")
    _boot(root, "healthy")
    for i in range(4):
        _boot(root, "crash")
        _boot(root, "crash")
        _, _, b = _boot(root, "healthy")
        assert b == ["b", "3.0.0", "False"]


def test_incomplete_or_damaged_slot_is_never_booted(tmp_path):
    root = flash_root(tmp_path)
    fv = _factory_version()
    _stage(tmp_path, root, "2.0.0")
    os.remove(os.path.join(root, "app", "a", "lib", "ovms", "util.mpy"))
    rc, out, b = _boot(root, "status")
    assert b == ["f", fv, "False"]
    assert json.loads(lines(out, "STATUS")[0])["fail"] == \
        "staged update in slot a is incomplete: discarded"
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    with open(os.path.join(root, "app", "a", "lib", "ovms", "pkg", "deep.mpy"), "ab") as f:
        f.write(b"junk")                                  # committed slot damaged later
    _, _, b = _boot(root)
    assert b == ["f", fv, "False"]                        # falls back to previous (factory)


def test_damaged_state_file_boots_a_complete_version(tmp_path):
    root = flash_root(tmp_path)
    fv = _factory_version()
    _stage(tmp_path, root, "2.0.0")
    _boot(root, "healthy")
    with open(os.path.join(root, "ota", "state.json"), "w") as f:
        f.write('{"run": "a", "prev')                     # torn write
    _, _, b = _boot(root)
    assert b == ["f", fv, "False"]
    with open(os.path.join(root, "ota", "state.tmp"), "w") as f:
        json.dump({"run": "a", "prev": "f"}, f)          # a save cut between write and rename
    os.remove(os.path.join(root, "ota", "state.json"))
    _, _, b = _boot(root)
    assert b == ["a", "2.0.0", "False"]


def test_update_refused_while_a_version_is_on_trial(tmp_path):
    root = flash_root(tmp_path)
    _stage(tmp_path, root, "2.0.0")
    b = app_bundle(tmp_path, "3.0.0")
    p = os.path.join(str(tmp_path), "b3.bin")
    with open(p, "wb") as f:
        f.write(b)
    bid = cli_ota.bundle_id(b)
    rc, out = device(root, "boot", "push", p, bid, "1024", "healthy", "push", p, bid, "1024")
    assert lines(out, "BOOT") == ["a 2.0.0 True"]
    assert lines(out, "ERR") == ["version 2.0.0 is on trial: retry after it is committed or "
                                 "rolled back"]
    assert lines(out, "HEALTHY") == ["True"] and lines(out, "STAGED") == ["3.0.0"]


def test_trial_guard_resets_an_app_that_never_gets_healthy(tmp_path):
    root = flash_root(tmp_path)
    _stage(tmp_path, root, "2.0.0", deadline=1)
    assert _state(root)["dl"] == 1
    cmd, env = device_cmd(root, "boot")
    code = open(cmd[3]).read().replace('print("DONE")', """
import asyncio, time
from ovms import ota
t = time.ticks_ms()
async def app():
    asyncio.create_task(ota.guard())
    await asyncio.sleep(10)
asyncio.run(app())
print("NOT RESET")
""")
    path = os.path.join(str(tmp_path), "guard.py")
    with open(path, "w") as f:
        f.write(code)
    r = subprocess.run(cmd[:3] + [path] + cmd[4:], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 99 and "NOT RESET" not in r.stdout, r.stdout + r.stderr
    rc, out, b = _boot(root, "status")
    assert b[0] == "f"
    assert json.loads(lines(out, "STATUS")[0])["fail"] == \
        "2.0.0 did not report healthy: rolled back"


def test_anti_rollback_refuses_a_replayed_older_bundle(tmp_path):
    """A recorded, validly signed bundle of an older (or the same) version is refused once a
    newer version was committed; a bundle signed as a deliberate downgrade is accepted."""
    root = flash_root(tmp_path)
    old = app_bundle(tmp_path, "2.0.0")
    p = os.path.join(str(tmp_path), "old.bin")
    with open(p, "wb") as f:
        f.write(old)
    rc, out = device(root, "push", p, cli_ota.bundle_id(old), "1024")
    assert lines(out, "STAGED") == ["2.0.0"], out
    _, _, b = _boot(root, "healthy")
    assert b == ["a", "2.0.0", "True"]       # (the trial, committed in this boot)
    assert _state(root)["sv"] == "2.0.0"
    _stage(tmp_path, root, "2.10.0")
    _, _, b = _boot(root, "healthy")
    assert b == ["b", "2.10.0", "True"] and _state(root)["sv"] == "2.10.0"
    # the replay of the recorded 2.0.0 bundle, and a same-version bundle: refused, nothing staged
    for v, bundle in (("2.0.0", old), ("2.10.0", app_bundle(tmp_path, "2.10.0"))):
        with open(p, "wb") as f:
            f.write(bundle)
        rc, out = device(root, "push", p, cli_ota.bundle_id(bundle), "1024")
        assert lines(out, "STAGED") == [], out
        assert any("not newer than 2.10.0" in ln and "anti-rollback" in ln for ln in out), out
        assert not _state(root).get("stg")
    _, _, b = _boot(root, "healthy")
    assert b == ["b", "2.10.0", "False"]
    # signed as a deliberate downgrade: accepted; the highest committed stays the floor
    _stage(tmp_path, root, "2.0.0", downgrade=True)
    _, _, b = _boot(root, "healthy")
    assert b == ["a", "2.0.0", "True"] and _state(root)["sv"] == "2.10.0"
