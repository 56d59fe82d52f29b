"""Starts the micro-ovms app unless boot.py chose safe mode; Ctrl-C stops it and returns to the REPL."""
if globals().get("safe_mode"):
    print("SAFE MODE: the app crashed %d boots in a row and was not started." % _boots)
    print("Check `from ovms import health; print(health.crashes())`, fix the cause, then")
    print("start it once with `from ovms import app; app.main()` or power-cycle the module.")
else:
    try:
        from ovms import app
    except Exception as e:  # a broken version must not stay running: log, count, reset
        import ota_boot
        ota_boot.crashed(e)
    app.main()
    del app  # stopped: give the REPL the app's heap
