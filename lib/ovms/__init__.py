"""micro-ovms: OVMS-style vehicle module firmware for MicroPython."""
VERSION = "0.1.0"

# App hooks for the shell's commands (see ovms.shell): kept here so that the app installs
# them without loading the shell, which loads on the first command.
hooks = {}


def load(name):
    """The module ovms.<name> (e.g. "metrics.io"), imported on first use. Use this, not
    `from ovms.pkg import sub`, for a submodule of a package that has a module __getattr__
    (the import would ask that __getattr__ first)."""
    return __import__("ovms." + name, None, None, (1,))


def unload(name):
    """Drop the module ovms.<name> (e.g. "metrics.io") from RAM: from sys.modules and from
    its package's namespace (an import stores the submodule there). No error if not loaded."""
    import sys
    sys.modules.pop("ovms." + name, None)
    pkg, _, sub = name.rpartition(".")
    p = sys.modules.get("ovms." + pkg) if pkg else sys.modules.get("ovms")
    if p is not None:
        p.__dict__.pop(sub, None)
