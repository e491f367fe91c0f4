"""The Binder configuration alone builds an environment that prepares the tutorials and runs them from that
preparation within Binder's memory (slow: a fresh venv, postBuild's `prepare --tutorials`, then the quickstart
and the tutorials that depend on prepared artefacts, executed through binder/start in that venv under the
memory watch of benchmarks/notebook_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET_GB = 1.8
NOTEBOOKS = ("00_quickstart.ipynb", "01_sae_features.ipynb", "03_model_diff.ipynb")
"""The quickstart and every tutorial that trains or builds something on first use unless `prepare` made it;
the nbval run executes all tutorials with the same packages (checked below) under the same budget."""


def _version_mismatches(freeze: str) -> list[str]:
    """Packages whose Binder version differs from (or is missing in) this test environment."""
    out = []
    for line in freeze.splitlines():
        if "==" not in line or line.startswith(("-e", "#")):
            continue
        name, version = line.split("==", 1)
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = None
        if here != version and not (name == "torch" and here and here.split("+")[0] == version.split("+")[0]):
            out.append(f"{name}: Binder {version}, tests {here}")
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TOOLKIT_SKIP_BINDER") == "1", reason="TOOLKIT_SKIP_BINDER=1")
def test_binder_env_prepares_and_runs_the_tutorials_within_budget(tmp_path):
    venv = tmp_path / "binder-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("TOOLKIT_LOW_MEMORY", None)  # binder/start sets it, as on mybinder.org
    # repo2docker installs binder/requirements.txt from the repository root, then runs binder/postBuild.
    r = subprocess.run([py, "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    assert "torch==2.13.0+cpu" in freeze and "nvidia" not in freeze.lower(), "Binder must get the CPU torch build"
    # the nbval run's memory budgets speak for Binder only if its kernels import the same packages
    assert _version_mismatches(freeze) == []
    benv = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    subprocess.run(["bash", str(ROOT / "binder" / "postBuild")], cwd=ROOT, env=benv, check=True)

    from toolkit.paths import cache_dir

    out = tmp_path / "memory.json"
    r = subprocess.run(["bash", str(ROOT / "binder" / "start"), py, str(ROOT / "benchmarks" / "notebook_memory.py"),
                        *[str(ROOT / "notebooks" / n) for n in NOTEBOOKS], "--template", str(cache_dir()),
                        "--budget-gb", str(BUDGET_GB), "--json", str(out)],
                       cwd=ROOT, env=benv, capture_output=True, text=True)
    report = r.stdout[-3000:] + r.stderr[-2000:]
    rows = {row["notebook"]: row for row in json.loads(out.read_text())}
    assert set(rows) == set(NOTEBOOKS), report
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"], report)
        assert row["peak"] <= BUDGET_GB * 1e9, f"{name}: peak kernel RSS {row['peak'] / 1e9:.2f} GB\n{report}"
        assert row["made"] == [], f"{name} made {row['made']} on first open: prepare --tutorials should have"
    assert r.returncode == 0, report
