"""Process-wide settings that make CPU training and benchmarks fast and repeatable."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory (``mallopt``).

    With glibc's defaults every activation of a 3-D network is a fresh ``mmap`` and its
    release a ``munmap``, so each step page-faults its whole working set again; on the
    project's 2-core VMs that made CPU steps 1.4x slower, and up to 5x while other
    processes were busy (``bench/network_speed.py --malloc default`` shows it).
    Returns whether glibc accepted the settings (False on other C libraries).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 2**30), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**28))
    )


def memory_kib(field: str) -> int | None:
    """``VmRSS`` (resident set) or ``VmHWM`` (its high-water mark) of this process in KiB,
    from ``/proc/self/status`` (Linux); None elsewhere. (``getrusage().ru_maxrss`` cannot
    serve: Linux carries it over ``fork`` + ``exec``.)"""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


#: marks the line of a fresh measurement process that carries its JSON result
RESULT_TAG = "MEMORY-JSON "


def print_result(result: dict) -> None:
    """In a fresh measurement process: hand ``result`` to the parent (see :func:`run_fresh`)."""
    import json

    print(RESULT_TAG + json.dumps(result), flush=True)


def run_fresh(command: list[str], what: str, cwd: str | None = None) -> dict:
    """Run ``command`` (a measurement in a fresh process, which calls :func:`print_result`)
    and return the result it printed; a failed process raises with its stderr's end."""
    import json
    import subprocess

    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"memory process for {what} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])
