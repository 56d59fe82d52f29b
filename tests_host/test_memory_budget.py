"""Issue #5's budget: the whole app (CAN + decoder + metrics + MQTT over TLS + health) on the
virtual device with --heap 100K through a replayed drive: no MemoryError, no growth."""
import bench_mem


def test_whole_app_through_a_drive_in_the_esp32_heap():
    r = bench_mem.run("100K", speed=2.0, quiet=True)
    print("memory budget: %s" % {k: v for k, v in r.items() if k != "series"})
    assert r["memory_errors"] == 0
    assert r["samples"] >= 10, r                    # the module answered all through the drive
    assert r["peak_used_bytes"] <= r["heap_bytes"]
    # steady state leaves room: at most 3/4 of the heap live after a collection
    assert r["steady_used_bytes"] <= r["heap_bytes"] * 3 // 4, r
    # no growth from the first to the last quarter (a few blocks: values that appear late)
    assert r["growth_bytes"] <= 1024, r["series"]
