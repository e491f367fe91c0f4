"""Peak memory and wall time of each tutorial, executed in a fresh kernel from a cold user cache.

Binder gives a session about 2 GB; the budget here is 1.8 GB of peak kernel RSS (headroom for the server).
Each notebook gets its own fresh TOOLKIT_CACHE_DIR holding only a link to the prepared default model (as
Binder's build leaves it without `prepare --tutorials`), or, with --template, hard links of a prepared cache
(as it leaves it with them). Peak RSS is the kernel's VmHWM (its own high-water mark, exact, no polling);
"tree" is the kernel plus its child processes, polled every 0.2 s. --per-cell prints both after each cell.

Run: .venv/bin/python benchmarks/notebook_memory.py [notebooks/01_sae_features.ipynb ...] [--per-cell]
     [--size ci|full] [--budget-gb 1.8] [--template DIR] [--json out.json]
Exit status 1 when a notebook fails or goes over budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def vm_hwm(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class TreeWatch(threading.Thread):
    """Polls the summed RSS of a process and its children; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self.stop = psutil.Process(pid), every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, total)
            except psutil.NoSuchProcess:
                return
            self.stop.wait(self.every)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def fresh_cache(template: Path | None, model_dir: Path) -> Path:
    """A new cache folder: hard links of `template` (new writes never touch it) or only the default model."""
    cache = Path(tempfile.mkdtemp(prefix="nbmem-cache-", dir=template.parent if template else None))
    if template is not None:
        for entry in template.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, cache / entry.name, copy_function=_link_or_copy, symlinks=True)
            else:
                os.symlink(entry.resolve(), cache / entry.name)
    if not (cache / model_dir.name).exists():
        os.symlink(model_dir.resolve(), cache / model_dir.name)
    return cache


def cache_entries(cache: Path, depth: int = 3) -> set[str]:
    """Relative paths in `cache` down to `depth` levels (an artefact's folder, e.g. saes/default/<key>)."""
    out: set[str] = set()
    for root, dirs, files in os.walk(cache, followlinks=True):
        rel = Path(root).relative_to(cache)
        if len(rel.parts) >= depth:
            dirs.clear()
            continue
        out.update((rel / n).as_posix() for n in [*dirs, *files] if not n.startswith("."))
    return out


def run_notebook(path: Path, cache: Path, size: str, per_cell: bool, timeout: int) -> dict:
    """Execute one notebook in a fresh kernel; return peak RSS (kernel, tree), wall time, any error, and what
    the kernel added to the cache (`made`: what it had to make because it was not prepared)."""
    nb = nbformat.read(path, as_version=4)
    before = cache_entries(cache)
    os.environ["TOOLKIT_CACHE_DIR"] = str(cache)
    os.environ["TOOLKIT_NB_SIZE"] = size
    os.environ.setdefault("TQDM_MININTERVAL", "2")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    state: dict = {"cells": [], "watch": None, "t_cell": time.perf_counter()}

    def on_cell_executed(cell, cell_index, **_):
        pid = client.km.provisioner.pid
        rec = {"cell": cell_index, "s": time.perf_counter() - state["t_cell"], "hwm": vm_hwm(pid),
               "rss": psutil.Process(pid).memory_info().rss}
        state["cells"].append(rec)
        state["t_cell"] = time.perf_counter()
        if per_cell:
            print(f"    cell {cell_index:3d}: {rec['s']:6.1f} s  rss {rec['rss'] / GB:5.2f} GB  "
                  f"peak so far {rec['hwm'] / GB:5.2f} GB", flush=True)

    def on_cell_start(cell, cell_index, **_):
        if state["watch"] is None:
            state["watch"] = TreeWatch(client.km.provisioner.pid)
            state["watch"].start()
        state["t_cell"] = time.perf_counter()

    client.on_cell_start = on_cell_start
    client.on_cell_executed = on_cell_executed
    t0 = time.perf_counter()
    error = None
    try:
        client.execute()
    except Exception as e:  # a failing cell still gives memory numbers up to that point
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    wall = time.perf_counter() - t0
    watch = state["watch"]
    if watch is not None:
        watch.stop.set()
    peak = max((c["hwm"] for c in state["cells"]), default=0)
    new = cache_entries(cache) - before
    made = sorted(e for e in new if not any(e.startswith(n + "/") for n in new))  # the top-most new entries
    return {"notebook": path.name, "peak": peak, "tree_peak": max(peak, watch.peak if watch else 0),
            "wall": wall, "error": error, "cells": state["cells"], "made": made}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--budget-gb", type=float, default=1.8)
    ap.add_argument("--size", choices=["ci", "full"], default="ci")
    ap.add_argument("--template", type=Path, help="a prepared cache to start from (hard-linked, never modified)")
    ap.add_argument("--per-cell", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from toolkit.convert import default_model_dir, default_model_ready, prepare_default_model

    if not default_model_ready():
        prepare_default_model()
    model_dir = default_model_dir()
    nbs = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(f"budget {args.budget_gb:.2f} GB peak kernel RSS; size {args.size}; cache "
          f"{'template ' + str(args.template) if args.template else 'cold (default model only)'}", flush=True)
    rows = []
    for nb in nbs:
        cache = fresh_cache(args.template, model_dir)
        print(f"{nb.name} ...", flush=True)
        try:
            rows.append(run_notebook(nb.resolve(), cache, args.size, args.per_cell, args.timeout))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        r = rows[-1]
        print(f"  peak {r['peak'] / GB:.2f} GB (tree {r['tree_peak'] / GB:.2f} GB), {r['wall']:.0f} s"
              + (f", ERROR {r['error']}" if r["error"] else ""), flush=True)
        if r["made"]:
            print(f"  made in the cache (not prepared): {', '.join(r['made'])}", flush=True)

    print(f"\n| notebook | peak kernel RSS | kernel + children | budget | wall, {os.cpu_count()} cores | |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for r in rows:
        ok = r["error"] is None and r["peak"] <= args.budget_gb * GB
        bad += not ok
        verdict = "ok" if ok else ("FAILED" if r["error"] else "OVER")
        print(f"| {r['notebook']} | {r['peak'] / GB:.2f} GB | {r['tree_peak'] / GB:.2f} GB | "
              f"{args.budget_gb:.2f} GB | {r['wall']:.0f} s | {verdict} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
