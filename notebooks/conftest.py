"""nbval runs each tutorial in a kernel that inherits this process's environment.

nbval reads a cell's IOPub messages only after the cell has finished, and the kernel drops messages past
ZeroMQ's high-water mark; a long cell whose progress widgets refresh often then loses its closing "idle"
message and fails with "Timeout of 5 seconds exceeded waiting for output". Bars refresh every 2 s here.

Memory guard (Binder gives a session about 2 GB): after every cell the kernel's peak RSS (VmHWM from /proc,
exact, no polling) is compared with the budget, and the cell that pushes it over fails, naming the peak.
It measures the nbval kernels themselves, so it adds no run. The peaks are always reported; the guard fails a
cell only when TOOLKIT_NB_MEMORY_BUDGET_GB is set (e.g. 1.8 with TOOLKIT_LOW_MEMORY=1, as on Binder): the
tutorials do not all fit that budget yet.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_MININTERVAL", "2")

BUDGET_GB = float(os.environ.get("TOOLKIT_NB_MEMORY_BUDGET_GB", "0"))
PEAKS: dict[str, int] = {}


def kernel_peak_rss(pid: int) -> int:
    """Peak resident set size of process `pid` in bytes (VmHWM), or 0 when /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _kernel_pid(item) -> int | None:
    kernel = getattr(item.parent, "kernel", None)
    km = getattr(kernel, "km", None)
    return getattr(getattr(km, "provisioner", None), "pid", None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    pid = _kernel_pid(item)
    if pid is None:
        return result
    peak = kernel_peak_rss(pid)
    PEAKS[item.parent.nodeid] = max(PEAKS.get(item.parent.nodeid, 0), peak)
    if BUDGET_GB > 0 and peak > BUDGET_GB * 1e9 and not getattr(item.parent, "over_budget", False):
        item.parent.over_budget = True  # fail the cell that crossed the budget, not every later one
        raise AssertionError(f"{Path(str(item.fspath)).name}: the notebook kernel's peak RSS reached "
                             f"{peak / 1e9:.2f} GB during this cell, over the {BUDGET_GB:.2f} GB Binder budget "
                             "(TOOLKIT_NB_MEMORY_BUDGET_GB); measure it with benchmarks/notebook_memory.py")
    return result


def pytest_terminal_summary(terminalreporter):
    if PEAKS:
        budget = f"budget {BUDGET_GB:.2f} GB" if BUDGET_GB > 0 else "no budget enforced"
        terminalreporter.write_line(f"notebook kernel peak RSS ({budget}):")
        for nb, peak in PEAKS.items():
            terminalreporter.write_line(f"  {nb}: {peak / 1e9:.2f} GB")
