"""The Binder configuration alone builds an environment that prepares the tutorials and runs the quickstart
(slow: a fresh venv, postBuild's `prepare --tutorials`, then the quickstart executed in that venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TOOLKIT_SKIP_BINDER") == "1", reason="TOOLKIT_SKIP_BINDER=1")
def test_binder_env_prepares_and_runs_the_quickstart(tmp_path):
    venv = tmp_path / "binder-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    # repo2docker installs binder/requirements.txt from the repository root, then runs binder/postBuild.
    r = subprocess.run([*pip, "install", "-q", "-r", "binder/requirements.txt"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    freeze = subprocess.run([*pip, "freeze"], capture_output=True, text=True, check=True).stdout
    assert "torch==2.13.0+cpu" in freeze and "nvidia" not in freeze.lower(), "Binder must get the CPU torch build"
    benv = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    subprocess.run(["bash", str(ROOT / "binder" / "postBuild")], cwd=ROOT, env=benv, check=True)
    out = tmp_path / "out"
    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", tmp_path / "q.ipynb")
    r = subprocess.run([str(venv / "bin" / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
                        "--ExecutePreprocessor.timeout=900", "--ExecutePreprocessor.kernel_name=python3",
                        "--output-dir", str(out), str(tmp_path / "q.ipynb")],
                       cwd=ROOT / "notebooks", env=benv, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    text = (out / "q.ipynb").read_text()
    assert "100 degrees" in text and '"output_type": "error"' not in text
