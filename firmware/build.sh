#!/usr/bin/env bash
# Build the micro-ovms MicroPython firmware (board MICRO_OVMS, app frozen in) in the official
# ESP-IDF container. Needs docker and network access; not run in CI. See firmware/README.md.
#
#   firmware/build.sh                  -> build/firmware/firmware.bin (flash at 0x1000) and
#                                         build/firmware/micropython.bin (app image for `ota push
#                                         --firmware`)
#   VARIANT=FLASH_8M firmware/build.sh -> 8 MiB flash layout
#   CAN_TX=27 CAN_RX=26 firmware/build.sh -> other transceiver pins
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# machine.CAN for the esp32 port is MicroPython PR #19461 (TWAI node driver, ESP-IDF >= 5.4).
# Once it is merged, set MPY_REF to the release tag that contains it.
MPY_REPO=${MPY_REPO:-https://github.com/micropython/micropython.git}
MPY_REF=${MPY_REF:-pull/19461/head}
IDF_IMAGE=${IDF_IMAGE:-espressif/idf:v5.4.2}
VARIANT=${VARIANT:-}
OUT=${OUT:-$REPO/build/firmware}
PY=${PY:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3

command -v docker >/dev/null || { echo "build.sh: docker is required" >&2; exit 2; }
mkdir -p "$OUT"

# Vehicle modules are generated on the host and frozen with the app (firmware/manifest.py).
"$PY" "$REPO/tools/vehicles.py" build-all -o "$REPO/build/vehicles"

docker run --rm \
    -v "$REPO":/src:ro -v "$OUT":/out \
    -e MPY_REPO="$MPY_REPO" -e MPY_REF="$MPY_REF" -e VARIANT="$VARIANT" \
    -e CAN_TX="${CAN_TX:-}" -e CAN_RX="${CAN_RX:-}" \
    -e HOST_UID="$(id -u)" -e HOST_GID="$(id -g)" \
    "$IDF_IMAGE" bash -euo pipefail -c '
        [ -n "$CAN_TX" ] || unset CAN_TX
        [ -n "$CAN_RX" ] || unset CAN_RX
        git clone --quiet --filter=blob:none "$MPY_REPO" /mp
        cd /mp
        git fetch --quiet origin "$MPY_REF"
        git checkout --quiet FETCH_HEAD
        make -C mpy-cross -j"$(nproc)"
        cp -r /src/firmware/boards/MICRO_OVMS ports/esp32/boards/
        cp /src/firmware/boards/MICRO_OVMS/partitions.csv ports/esp32/partitions-micro-ovms.csv
        cp /src/firmware/boards/MICRO_OVMS/partitions-8MiB.csv \
            ports/esp32/partitions-micro-ovms-8MiB.csv
        cd ports/esp32
        # the CAN RX ring length of the board (MICRO_OVMS_CAN_RX_RING) into the driver: its
        # "#define <...RX...> (16)" ring constant; the build stops if the driver has none
        RING=$(sed -n "s/^#define MICRO_OVMS_CAN_RX_RING *(\([0-9]*\)).*/\1/p" \
            boards/MICRO_OVMS/mpconfigboard.h)
        DRV=$(grep -lE "^#define +[A-Z0-9_]*RX[A-Z0-9_]*(RING|QUEUE|BUF)[A-Z0-9_]* +\(?16\)?" \
            machine_can*.c *can*.c 2>/dev/null | head -1 || true)
        [ -n "$RING" ] && [ -n "$DRV" ] || {
            echo "build.sh: no CAN RX ring length to set (board: $RING, driver: $DRV)" >&2; exit 1; }
        sed -i -E "s/^(#define +[A-Z0-9_]*RX[A-Z0-9_]*(RING|QUEUE|BUF)[A-Z0-9_]* +)\(?16\)?/\1($RING)/" "$DRV"
        grep -nE "^#define +[A-Z0-9_]*RX[A-Z0-9_]*(RING|QUEUE|BUF)" "$DRV"
        ARGS="BOARD=MICRO_OVMS"
        [ -z "$VARIANT" ] || ARGS="$ARGS BOARD_VARIANT=$VARIANT"
        make $ARGS submodules
        make $ARGS FROZEN_MANIFEST=/src/firmware/manifest.py -j"$(nproc)"
        B=$(ls -d build-MICRO_OVMS* | head -1)
        cp "$B/firmware.bin" "$B/micropython.bin" /out/
        cp "$B/bootloader/bootloader.bin" "$B/partition_table/partition-table.bin" /out/
        chown -R "$HOST_UID:$HOST_GID" /out
    '

SLOT=$((0x180000))
[ "$VARIANT" = "FLASH_8M" ] && SLOT=$((0x300000))
SIZE=$(stat -c %s "$OUT/micropython.bin")
echo "micropython.bin: $SIZE bytes of a $SLOT-byte OTA slot ($((100 * SIZE / SLOT))%)"
if [ "$SIZE" -gt "$SLOT" ]; then
    echo "build.sh: the image does not fit the OTA slot" >&2
    exit 1
fi
echo "flash with: make flash PORT=/dev/ttyUSB0   (or python tools/ovms.py flash -p ...)"
