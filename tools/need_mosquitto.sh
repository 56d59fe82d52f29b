#!/bin/sh
# Make sure Debian's mosquitto broker (and its clients) are installed.
PATH="$PATH:/usr/sbin:/sbin"
if command -v mosquitto >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing mosquitto (apt-get)..." >&2
    apt-get update -qq >/dev/null && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null && exit 0
fi
cat >&2 <<MSG
error: the MQTT broker 'mosquitto' is not installed and could not be installed automatically.
Install it with your package manager, e.g.:
    sudo apt-get install mosquitto mosquitto-clients
then run make again.
MSG
exit 1
