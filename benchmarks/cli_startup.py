"""Seconds to build the `gainrl-pl` CLI parser (every launch pays it before any work), with jsonargparse's
attribute docstrings off (ours) against on (how the CLI built it before), interleaved in one process.

    .venv/bin/python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time


def build_seconds(attribute_docstrings: bool) -> float:
    from jsonargparse import set_parsing_settings

    from gainrl_pl.cli import main

    set_parsing_settings(docstring_parse_attribute_docstrings=attribute_docstrings)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["fit", "--config", "configs/demo.yaml", "--print_config"])  # parse and print, no model built
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed builds per setting (after one warm-up each)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI warns when it gets args while the process has command-line ones
    for setting in (False, True):  # warm-up: imports and first-use caches
        build_seconds(setting)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for setting in ((False, True) if i % 2 == 0 else (True, False)):
            times[setting].append(build_seconds(setting))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"parser build, median of {args.repeats}: attribute docstrings off {off:.2f} s, on {on:.2f} s, "
          f"on / off = {on / off:.1f}x")


if __name__ == "__main__":
    main()
