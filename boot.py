"""Runs first at every boot, kept tiny (no network): picks the app version, counts crash boots."""
import machine

try:
    import ota_boot
    ota_boot.select()  # the OTA slot to run (or the factory app), with trial boots and rollback
except Exception as e:  # a damaged OTA state must never stop the factory app from booting
    print("boot: OTA slot selection failed:", repr(e))

# Crashes in a row that did not reach a stable app (the app clears the count after 60 s),
# each counted once, here. The ESP32 reports machine.reset(), an OTA reboot and a panic all as
# HARD_RESET: a flag written just before a reset (ota_boot.RESET_FLAG) tells them apart. An app
# crash ("crash"), a panic (no flag) and a hang the watchdog caught (no flag) count; a power-on
# starts from zero; deliberate resets (`module reset`, OTA reboot) and watchdog resets the health
# task chose for a module that had been healthy ("wdt") never count.
try:
    with open("/store/boots") as f:
        _boots = int(f.read())
except (OSError, ValueError):
    _boots = 0
try:
    with open("/store/reset") as f:
        _why = f.read()
    import os
    os.remove("/store/reset")
    del os
except OSError:
    _why = None
_cause = machine.reset_cause()
if _cause == machine.PWRON_RESET or _cause in (machine.WDT_RESET, machine.HARD_RESET):
    if _cause == machine.PWRON_RESET:
        _boots = 0
    elif _why == "crash" or _why is None or (_why == "wdt") != (_cause == machine.WDT_RESET):
        _boots += 1
    try:
        with open("/store/boots", "w") as f:
            f.write(str(_boots))
    except OSError:
        pass
safe_mode = _boots >= 3
