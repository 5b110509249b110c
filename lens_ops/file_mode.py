"""Permissions of the files LoRA Lens writes (kept free of torch: `.loradb` listing and extraction run without it)."""
from __future__ import annotations


def new_file_mode() -> int:
    """The permissions a plain open() would give a new file (0666 minus the umask). Outputs are written to a
    mkstemp file (0600, private) and renamed into place, so they are set to this first: a LoRA written here is
    readable like any other file the user makes. The umask is read from /proc, not set and reset, which would
    race with other threads (ComfyUI's server)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644
