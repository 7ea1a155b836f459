"""A/B speed comparison of two commits: one benchmark command, run in a fresh worktree of each.

The runs alternate A B A B ... (``--pairs``, default 5) in one call, so both sides see the
same machine state; one number per run comes from ``--metric`` (a regex over the output; its
first group if any) or ``--json-key`` (a dotted key of the JSON the run writes to the path
that ``{json}`` in the command stands for). Printed: each side's median and spread
(min-max), head/base, and a verdict. The rule: a head median inside the spread of the base
runs is "no change" -- noise, not to be re-run until it looks different; otherwise "faster"
or "slower" by the difference of the medians.

    python benchmarks/ab.py --base HEAD~1 --json-key results.0.ms_per_iter -- \\
        torchrun --nproc-per-node 1 benchmarks/bench_end_to_end.py --sp 1 --seq-length 16384 \\
        --json {json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import REPO, ab_compare


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s --base REV [--head REV] (--metric REGEX | --json-key KEY) -- COMMAND ...",
    )
    p.add_argument("--base", required=True, help="the baseline commit (A)")
    p.add_argument("--head", default="HEAD", help="the commit compared with it (B; default HEAD)")
    p.add_argument("--pairs", type=int, default=5, help="A B pairs (default 5)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--metric", help="regex over each run's output, e.g. 'ms/iter: ([0-9.]+)'")
    what.add_argument("--json-key", help="dotted key of the run's JSON ({json} in the command)")
    p.add_argument("--higher-is-better", action="store_true", help="e.g. tokens/s (default: ms)")
    p.add_argument("--timeout-s", type=float, default=None, help="limit of each run")
    p.add_argument("--repo", type=Path, default=REPO, help="the git repository (default: this)")
    p.add_argument("--json", type=Path, default=None, help="write the runs and verdict here")
    args = p.parse_args(argv)
    if not command:
        p.error("give the benchmark command after --")
    if args.json_key and not any("{json}" in a for a in command):
        p.error("--json-key reads the file that {json} in the command names; add it")
    print(f"A = {args.base}, B = {args.head}, {args.pairs} pairs: {' '.join(command)}", flush=True)
    result = ab_compare(
        command, args.base, args.head, args.repo, args.pairs, args.metric, args.json_key,
        args.higher_is_better, args.timeout_s, log=lambda line: print(line, flush=True),
    )  # fmt: skip
    print("\n" + result.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command, "base": result.base, "head": result.head,
            "base_values": result.base_values, "head_values": result.head_values,
            "base_median": result.base_median, "head_median": result.head_median,
            "ratio": result.ratio, "verdict": result.verdict,
            "higher_is_better": result.higher_is_better,
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
