# Frozen modules of the micro-ovms firmware (FROZEN_MANIFEST, see build.sh). Paths are relative
# to this file: the manifest tool runs it with the current directory set to firmware/.
import os

# The port's default set (asyncio, networking helpers, ...).
include("$(PORT_DIR)/boards/manifest.py")

# The app: every package and module in lib/ (ovms, the boot helper ota_boot, libraries).
for _name in sorted(os.listdir("../lib")):
    _p = os.path.join("../lib", _name)
    if _name.endswith(".py"):
        module(_name, base_path="../lib")
    elif os.path.isdir(_p) and os.path.exists(os.path.join(_p, "__init__.py")):
        package(_name, base_path="../lib")

# Vehicle modules generated from firmware/vehicles (build.sh runs tools/vehicles.py first).
if os.path.isdir("../build/vehicles"):
    for _name in sorted(os.listdir("../build/vehicles")):
        if _name.endswith(".py"):
            module(_name, base_path="../build/vehicles")

# Entry points. Frozen boot.py/main.py run instead of files of the same name on the flash.
module("boot.py", base_path="..")
module("main.py", base_path="..")
