"""Atomic file writes: write <path>.tmp, then rename it over <path> (FAT: remove first)."""
import os


def replace(src, dst):
    """Rename src over dst. File systems that cannot rename over an existing file (FAT) get
    dst removed first: a cut in between leaves dst missing and src complete, which readers
    that care (config, outbox) take as the new file."""
    try:
        os.rename(src, dst)
    except OSError:
        try:
            os.remove(dst)
        except OSError:
            pass
        os.rename(src, dst)


def write(path, data, mode="w"):
    """Write path atomically (the old content stays until the new one is complete). data is
    str/bytes, or a function fn(f) writing into the open temp file (its result is returned)."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        r = data(f) if callable(data) else f.write(data)
    replace(tmp, path)
    return r
