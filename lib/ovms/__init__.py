"""micro-ovms: OVMS-style vehicle module firmware for MicroPython."""
VERSION = "0.1.0"

# App hooks for the shell's commands (see ovms.shell): kept here so that the app installs
# them without loading the shell, which loads on the first command.
hooks = {}
