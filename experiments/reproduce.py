"""The paper's three studies on the default model, in one command.

    python experiments/reproduce.py [--out results] [--quick] [--model default] [--seeds 0 1 2]

Trains the default model first if it is missing (~10 minutes on 2 CPU cores), then runs
`split_sweep`, `modality` and `restoration`, each writing `<out>/<study>.json|md|png`, and collects
the tables in `<out>/reproduce.md`. Every number is the mean ± sample standard deviation over the
calibration seeds (`--seeds`; restoration's training seed too), on one pretrained model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import modality
import restoration
import split_sweep
from common import add_seeds_flag, check_seeds, machine
from sparsevlm import hub
from sparsevlm.integrity import write_atomic

STUDIES = {"split_sweep": split_sweep, "modality": modality, "restoration": restoration}
SEEDS = (0, 1, 2)  # issue 21: pruned accuracies move by points between machines, so every study reports a spread


def main(argv: list[str] | None = None) -> None:
    """Run every study with the shared flags; write the combined report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="small budgets, for CI")
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    add_seeds_flag(parser, SEEDS)
    args = parser.parse_args(argv)
    check_seeds(parser, args)
    hub.resolve_model_path(args.model)  # train the default model up front, not inside a study
    shared = ["--model", args.model, "--out", args.out, "--seeds", *map(str, args.seeds)]
    shared += ["--quick"] if args.quick else []
    started = time.perf_counter()
    seconds = {}
    for name in args.studies:
        print(f"== {name} ==", flush=True)
        began = time.perf_counter()
        STUDIES[name].main(shared)
        seconds[name] = time.perf_counter() - began
    info = machine()
    lines = [f"# Reproduction ({info['date']}, {info['cpu_count']} CPU cores, {info['platform']} "
             f"{info['device']}, jax {info['jax']})", ""]
    for name in args.studies:
        lines += [f"## {name} ({seconds[name]:.0f} s)", "", (Path(args.out) / f"{name}.md").read_text(), ""]
    lines.append(f"Total {time.perf_counter() - started:.0f} s.")
    write_atomic(Path(args.out) / "reproduce.md", "\n".join(lines))
    print(f"wrote {Path(args.out) / 'reproduce.md'}")


if __name__ == "__main__":
    sys.exit(main())
