# micro-ovms board: ESP32 with TWAI (machine.CAN), OTA partition table, rollback-capable
# bootloader, frozen app (firmware/manifest.py, passed as FROZEN_MANIFEST by firmware/build.sh).
set(IDF_TARGET esp32)

set(SDKCONFIG_DEFAULTS
    boards/sdkconfig.base
    ${MICROPY_BOARD_DIR}/sdkconfig.board
)

if(MICROPY_BOARD_VARIANT STREQUAL "FLASH_8M")
    list(APPEND SDKCONFIG_DEFAULTS ${MICROPY_BOARD_DIR}/sdkconfig.flash8m)
endif()

# Transceiver pins: CAN_TX=.. CAN_RX=.. in the environment of firmware/build.sh.
if(DEFINED ENV{CAN_TX})
    list(APPEND MICROPY_DEF_BOARD MICROPY_HW_CAN1_TX=$ENV{CAN_TX})
endif()
if(DEFINED ENV{CAN_RX})
    list(APPEND MICROPY_DEF_BOARD MICROPY_HW_CAN1_RX=$ENV{CAN_RX})
endif()
