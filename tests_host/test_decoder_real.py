"""Real CAN logs through tools/candecode.py (device decoder on micropython) == cantools values."""
import gzip
import json
import math
import os
import subprocess
import sys

import pytest

from util import DATA, REPO, data, needs_corpus, reference

KONA = "kona_ev"
RAV4 = "toyota_rav4_comma2k19"
RAV4_LOG = "comma2k19_rav4_b0c9d2329ad1606b_2018-08-02--08-34-47_seg40.log"
K1 = "230112-7-2019-pcan-ccan-power-off-on-ready-off"
K2 = "221217-1-2021-pcan-bcan-no-key"
K3 = "250105-1-2020-comp-can-heating"

# (log, bus, dbc) as corpus paths (util.data); the cantools values are recomputed (util.reference)
CASES = [
    (f"{KONA}/logs/{K1}.log", "can0", f"{KONA}/dbc/pcan.dbc"),
    (f"{KONA}/logs/{K1}.log", "can1", f"{KONA}/dbc/ccan.dbc"),
    (f"{KONA}/logs/{K2}.log", "can0", f"{KONA}/dbc/pcan.dbc"),
    (f"{KONA}/logs/{K2}.log", "can1", f"{KONA}/dbc/bcan.dbc"),
    (f"{KONA}/logs/{K3}.log", "can0", f"{KONA}/dbc/comp_can.dbc"),
    (f"{RAV4}/logs/{RAV4_LOG}", "can0", f"{RAV4}/dbc/toyota_new_mc_pt_generated.dbc"),
    (f"{RAV4}/logs/{RAV4_LOG}", "can1", f"{RAV4}/dbc/toyota_adas.dbc"),
]
EXPECTED = {f"{KONA}/logs/{k}.log": f"{KONA}/expected/{k}.expected.jsonl.gz" for k in (K1, K2, K3)}
EXPECTED[f"{RAV4}/logs/{RAV4_LOG}"] = f"{RAV4}/expected/comma2k19_rav4_seg40.expected.jsonl.gz"
IDS = ["kona1-can0", "kona1-can1", "kona2-can0", "kona2-can1", "kona3-can0", "rav4-can0", "rav4-can1"]


def candecode(*args):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "candecode.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def resolve(case):
    """(log path, bus, dbc path, cantools reference records of that bus)."""
    log, bus, dbc = case
    return data(log), bus, data(dbc), reference(data(log), bus, data(dbc))


@needs_corpus
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recomputed_reference_equals_corpus_expected(case):
    """The references recomputed with the pinned cantools are the corpus' shipped ones."""
    log, bus, dbc, got = resolve(case)
    with gzip.open(os.path.join(DATA, EXPECTED[case[0]]), "rt") as f:
        want = [r for r in (json.loads(line) for line in f) if r["bus"] == bus]
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert g == w, (w, g)


def same(want, got):
    if isinstance(want, float):
        return isinstance(got, float) and (got == want or math.isclose(got, want, rel_tol=1e-6)
                                           or (math.isnan(want) and math.isnan(got)))
    return type(got) is type(want) and got == want


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_real_log_matches_cantools(case):
    log, bus, dbc, want = resolve(case)
    got = candecode("--dbc", dbc, "--log", log, "--bus", bus)
    # one record per frame of a DBC-defined id, in log order
    assert len(got) == len(want)
    bad = []
    for w, g in zip(want, got):
        assert (g["t"], g["id"]) == (w["t"], w["id"])
        phys = dict(w["signals"])
        phys.update(w.get("choices", {}))          # decode_choices=True: labels win
        assert set(g["signals"]) == set(phys), (w, g)   # truncated frames: same subset
        for name, v in phys.items():
            if not same(v, g["signals"][name]):
                bad.append((w["t"], w["msg"], name, v, g["signals"][name]))
    assert not bad, bad[:10]


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[IDS[0], IDS[5]])
def test_real_log_raw_values_exact(case):
    log, bus, dbc, want = resolve(case)
    got = candecode("--dbc", dbc, "--log", log, "--bus", bus, "--raw")
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert g["signals"] == w["raw"], (w, g)
        assert all(type(v) is int for v in g["signals"].values())


def test_truncated_frames_present_and_limited():
    """The Kona 230112-7 log has 961 frames shorter than their DBC length: only signals
    whose bytes all arrived are printed (cantools allow_truncated=True)."""
    log, bus, dbc, want = resolve(CASES[0])
    want = [w for w in want if w.get("truncated")]
    assert len(want) > 200
    got = {(g["t"], g["id"]): g for g in candecode("--dbc", dbc, "--log", log, "--bus", bus)}
    for w in want:
        g = got[(w["t"], w["id"])]
        assert set(g["signals"]) == set(w["signals"])


def test_without_bus_all_frames_use_the_dbc(tmp_path):
    """No --bus: every frame is decoded with the given DBC (ids it defines print)."""
    log, _, dbc, want = resolve(CASES[4])       # single-bus log
    got = candecode("--dbc", dbc, "--log", log)
    assert len(got) == len(want)
