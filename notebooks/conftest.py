"""nbval runs each tutorial in a kernel that inherits this process's environment.

nbval reads a cell's IOPub messages only after the cell has finished, and the kernel drops messages past
ZeroMQ's high-water mark; a long cell whose progress widgets refresh often then loses its closing "idle"
message and fails with "Timeout of 5 seconds exceeded waiting for output". Bars refresh every 2 s here.

Memory guard (Binder gives a session about 2 GB): the kernels run as on Binder (TOOLKIT_LOW_MEMORY=1, which
binder/start sets, unless the environment sets it otherwise), and after every cell the kernel's peak RSS
(VmHWM from /proc, exact, no polling) is compared with its notebook's budget; the cell that pushes it over
fails, naming the peak. It measures the nbval kernels themselves, so it adds no run. Every tutorial has the
1.8 GB Binder budget (BUDGETS_GB lists the peaks measured with benchmarks/notebook_memory.py);
TOOLKIT_NB_MEMORY_BUDGET_GB=x applies x to every notebook instead (0: none).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_MININTERVAL", "2")

BINDER_GB = 1.8
BUDGETS_GB: dict[str, float] = {  # peaks measured with TOOLKIT_LOW_MEMORY=1 at CI size, prepared cache
    "00_quickstart.ipynb": BINDER_GB,  # 1.22 GB, 10 s
    "01_sae_features.ipynb": BINDER_GB,  # 1.66 GB, 73 s
    "02_train_sae.ipynb": BINDER_GB,  # 1.29 GB, 108 s
    "03_model_diff.ipynb": BINDER_GB,  # 1.65 GB, 30 s
    "04_steering.ipynb": BINDER_GB,  # 1.63 GB, 64 s
    "05_axbench.ipynb": BINDER_GB,  # 1.75 GB, 258 s
    "06_recipes.ipynb": BINDER_GB,  # 1.62 GB, 59 s
    "07_recipes_editing.ipynb": BINDER_GB,  # 1.54 GB, 194 s
}
"""A tutorial missing here gets BINDER_GB too: a new notebook must fit Binder from the start."""
_OVERRIDE = os.environ.get("TOOLKIT_NB_MEMORY_BUDGET_GB")
LOW_MEMORY = os.environ.get("TOOLKIT_LOW_MEMORY", "1") == "1"
PEAKS: dict[str, int] = {}


def budget_gb(notebook: str) -> float:
    """The peak-RSS budget of a tutorial's kernel in GB (0: none): the override, else BUDGETS_GB when the
    kernels run in low-memory mode as on Binder (an all-fp32 kernel is not what Binder runs)."""
    if _OVERRIDE is not None:
        return float(_OVERRIDE)
    return BUDGETS_GB.get(notebook, BINDER_GB) if LOW_MEMORY else 0.0


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
def pytest_runtest_setup(item):
    """Start each notebook's kernel with TOOLKIT_LOW_MEMORY as Binder has it, without touching this process."""
    if getattr(item.parent, "kernel", False) is not None or "TOOLKIT_LOW_MEMORY" in os.environ:
        return (yield)
    os.environ["TOOLKIT_LOW_MEMORY"] = "1"
    try:
        return (yield)
    finally:
        del os.environ["TOOLKIT_LOW_MEMORY"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    pid = _kernel_pid(item)
    if pid is None:
        return result
    peak = kernel_peak_rss(pid)
    PEAKS[item.parent.nodeid] = max(PEAKS.get(item.parent.nodeid, 0), peak)
    name = Path(str(item.fspath)).name
    budget = budget_gb(name)
    if budget > 0 and peak > budget * 1e9 and not getattr(item.parent, "over_budget", False):
        item.parent.over_budget = True  # fail the cell that crossed the budget, not every later one
        raise AssertionError(f"{name}: the notebook kernel's peak RSS reached {peak / 1e9:.2f} GB during this "
                             f"cell, over its {budget:.2f} GB Binder budget (notebooks/conftest.py BUDGETS_GB, "
                             "TOOLKIT_NB_MEMORY_BUDGET_GB); measure it with benchmarks/notebook_memory.py --per-cell")
    return result


def pytest_terminal_summary(terminalreporter):
    if PEAKS:
        mode = "low-memory kernels" if LOW_MEMORY else "fp32 kernels"
        terminalreporter.write_line(f"notebook kernel peak RSS ({mode}):")
        for nb, peak in PEAKS.items():
            b = budget_gb(Path(nb).name)
            terminalreporter.write_line(f"  {nb}: {peak / 1e9:.2f} GB"
                                        + (f" (budget {b:.2f} GB)" if b > 0 else " (no budget)"))
