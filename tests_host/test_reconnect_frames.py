"""Frames keep flowing through reconnects: the virtual device replaying a real drive at its
recorded rate, with the board's CAN RX ring (firmware/boards/MICRO_OVMS/mpconfigboard.h),
loses no frame while the MQTT link is cut and re-established (tools/bench_reconnect.py)."""
import bench_reconnect
import vdev


def test_board_ring_bridges_the_esp32_stalls():
    # 45-ms sector erase (caches off) at the Kona's ~3,600 frames/s on one bus
    assert vdev.board_ring() * 1000 // 3600 >= 45


def test_no_frame_lost_through_reconnects():
    r = bench_reconnect.run(reconnects=3, steady_s=10)
    print(r)
    assert r["frames"] > 10000
    assert r["overruns_reconnects"] == 0, r
    assert r["overruns_steady"] == 0, r
