#!/bin/sh
# Make sure the Debian packages the tests and the sim run against are installed: the
# mosquitto broker (and its clients) and gpsd (gpsfake, the NMEA reference).
PATH="$PATH:/usr/sbin:/sbin"
if command -v mosquitto >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 \
        && command -v gpsfake >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing mosquitto and gpsd (apt-get)..." >&2
    apt-get update -qq >/dev/null && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
        gpsd gpsd-clients >/dev/null && exit 0
fi
cat >&2 <<MSG
error: mosquitto and gpsd are not installed and could not be installed automatically.
Install them with your package manager, e.g.:
    sudo apt-get install mosquitto mosquitto-clients gpsd gpsd-clients
then run make again.
MSG
exit 1
