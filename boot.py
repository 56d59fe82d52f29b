"""Runs first at every boot, kept tiny (no network): picks the app version, counts crash boots."""
import machine

try:
    import ota_boot
    ota_boot.select()  # the OTA slot to run (or the factory app), with trial boots and rollback
except Exception as e:  # a damaged OTA state must never stop the factory app from booting
    print("boot: OTA slot selection failed:", repr(e))

# Crashes in a row that did not reach a stable app (the app clears the count after 60 s):
# app crashes are counted where they are caught (ota_boot.crashed), watchdog resets and
# interpreter crashes here. A power-on starts from zero: switching the car off and on, a
# `module reset` or an OTA reboot never count.
try:
    with open("/store/boots") as f:
        _boots = int(f.read())
except (OSError, ValueError):
    _boots = 0
_cause = machine.reset_cause()
if _cause == machine.PWRON_RESET or _cause in (machine.WDT_RESET, machine.HARD_RESET):
    _boots = 0 if _cause == machine.PWRON_RESET else _boots + 1
    try:
        with open("/store/boots", "w") as f:
            f.write(str(_boots))
    except OSError:
        pass
safe_mode = _boots >= 3
