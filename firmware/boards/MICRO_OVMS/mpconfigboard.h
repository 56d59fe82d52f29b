// micro-ovms: ESP32 (classic, 4 MiB flash) + CAN transceiver on the TWAI controller.
#define MICROPY_HW_BOARD_NAME               "micro-ovms ESP32"
#define MICROPY_HW_MCU_NAME                 "ESP32"
#define MICROPY_PY_NETWORK_HOSTNAME_DEFAULT "micro-ovms"

// machine.CAN on the TWAI controller (ESP32 port of machine.CAN: MicroPython PR #19461,
// needs ESP-IDF >= 5.4). TX/RX pins of the transceiver; override with CAN_TX/CAN_RX in build.sh.
#define MICROPY_HW_ENABLE_CAN               (1)
#ifndef MICROPY_HW_CAN1_TX
#define MICROPY_HW_CAN1_TX                  (5)
#endif
#ifndef MICROPY_HW_CAN1_RX
#define MICROPY_HW_CAN1_RX                  (4)
#endif
// Slots of the driver's RX ring (the ISR fills it, the app's drain task empties it). The
// port's 16 slots last 4-10 ms of a busy vehicle bus (1,650-3,600 frames/s): less than one
// GC, one TLS handshake step in C or one 45-ms flash sector erase (caches off: no code from
// flash runs). 256 slots (~4 KB of internal RAM) bridge ~70 ms at 3,600 frames/s.
// build.sh writes this into the port's driver source; tools/vdev.py reads it from here.
#define MICRO_OVMS_CAN_RX_RING              (256)

// Not used by the module: leaves room in the 1.5 MiB OTA slot for the frozen app.
#define MICROPY_PY_BLUETOOTH                (0)
#define MICROPY_PY_ESPNOW                   (0)

// OTA signature check: RSA with the built-in three-argument pow() on arbitrary-precision ints.
// The ESP32 port already uses MICROPY_LONGINT_IMPL_MPZ; pow(a, b, c) is made explicit here.
#define MICROPY_PY_BUILTINS_POW3            (1)
