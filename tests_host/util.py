"""Shared test helpers: paths, running code on the MicroPython unix binary."""
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(REPO, "lib")
TOOLS = os.path.join(REPO, "tools")
DATA = os.environ.get("OVMS_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
TESTDATA = os.path.join(REPO, "tests_host", "data")
BIN = os.path.dirname(sys.executable)


def tool(name):
    """Path of a toolchain executable (the venv's first)."""
    p = os.path.join(BIN, name)
    return p if os.path.exists(p) else shutil.which(name)


MICROPYTHON = tool("micropython")
MPY_CROSS = tool("mpy-cross")


def run_mpy(code, heap="100K", timeout=120, path=(LIB,), cwd=None, check=True, args=()):
    """Run `code` on the micropython binary with `path` prepended to sys.path.

    Returns the CompletedProcess (text). Raises AssertionError with output on failure
    when check is true."""
    pre = "import sys\nsys.path[:0] = %r\n" % (list(path),)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(pre + code)
        script = f.name
    try:
        r = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, script, *args],
                           capture_output=True, text=True, timeout=timeout, cwd=cwd)
    finally:
        os.unlink(script)
    if check and r.returncode != 0:
        raise AssertionError("micropython failed (%d)\nstdout:\n%s\nstderr:\n%s"
                             % (r.returncode, r.stdout[-4000:], r.stderr[-4000:]))
    return r
