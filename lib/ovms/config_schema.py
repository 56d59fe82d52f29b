"""Config schema table: one line per param/instance (names follow OVMS v3)."""

# One entry per line: "param instance type default spec"
#   type: s = string, S = secret string (write-only), i = integer, b = bool (yes/no),
#         e = enum
#   default: "-" = empty string
#   spec: s/S = max length, i = min:max, e = choice|choice|..., b = "-"
#   instance "*" = free-form instance names (any name is accepted for that param)
# Kept as one string (not a dict of tuples) to keep RAM small; looked up with str.find.
SCHEMA = """
vehicle id s - 32
vehicle type s - 16
vehicle name s - 32
vehicle timezone s UTC0 64
vehicle units.distance e K K|M
vehicle units.temp e C C|F
vehicle can.mode e listen listen|normal
vehicle can.bitrate i 500000 10000:1000000
vehicle minsoc i 0 0:100
server.v3 server s - 128
server.v3 port i 0 0:65535
server.v3 tls b yes -
server.v3 user s - 64
server.v3 clientid s - 64
server.v3 topic.prefix s - 96
server.v3 ca s /store/ca.pem 128
server.v3 updatetime.on i 5 1:3600
server.v3 updatetime.charging i 10 1:3600
server.v3 updatetime.connected i 10 1:3600
server.v3 updatetime.awake i 60 1:86400
server.v3 updatetime.idle i 600 1:86400
server.v3 updatetime.sendall i 1200 0:86400
server.v3 updatetime.keepalive i 120 10:3600
server.v3 updatetime.priority b no -
server.v3 updatetime.immediately b no -
server.v3 metrics.include s - 256
server.v3 metrics.exclude s - 256
server.v3 metrics.priority s - 256
server.v3 metrics.include.immediately s - 256
server.v3 metrics.exclude.immediately s - 256
server.v3 queue.sendall i 100 1:1000
server.v3 queue.modified i 150 1:1000
server.v3 events.legacy_topic b yes -
server.v3 retain.depth.limit b no -
server.v3 conn.stable_wait i 10 3:600
server.v3 conn.jitter.max i 5 0:60
server.v3 shell.readonly b no -
server.v3 shell.timeout i 300 0:86400
password module S - 64
password server.v3 S - 128
wifi.ssid * S - 64
wifi.ap * S - 64
auto init b yes -
auto server.v3 b yes -
auto wifi.mode e client off|client|ap|apclient
auto wifi.ssid.client s - 32
module watchdog.timeout i 60 0:3600
module safemode.crashes i 3 1:20
module hostname s - 32
ota pubkey s /store/ota.pub 128
ota health.deadline i 120 10:3600
usr * s - 256
"""
