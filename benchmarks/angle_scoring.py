"""Angle-scoring throughput, memory and length scaling: reference vs `AngleScorer` vs the limit (issue 7, part 1).

Three ways to get the same angle scores for GSM8K prompts, timed in one process and interleaved
(A, B, C, then B, C, A, ...) so that load from other jobs on a shared machine hits all of them:

- `reference`: what the reference GAIN-RL script does. One prompt at a time, a full forward with
  `output_hidden_states=True` (all hidden states and the full-vocabulary logits), then an L x L cosine
  matrix per prompt whose question/prefix blocks are averaged. The target site (the MLP input of the
  scoring layer, as `AngleScorer` reads it) is taken by a pass-through hook, so both methods score the
  same hidden states and their scores can be compared.
- `ours`: `gainrl_pl.scoring.AngleScorer` (batched, length-bucketed, stops at the target layer, O(L*d)).
- `limit`: the cheapest forward that can produce those hidden states: pre-padded, length-sorted batches
  of the model body only, stopped at the target site, nothing scored. Ours cannot beat it; the gap to
  it is our overhead (padding, masks, the score itself).

Peak memory is measured per method in a fresh subprocess, as the rise of the peak RSS (VmHWM, reset
through /proc/self/clear_refs; tracemalloc does not see torch's allocations) or of
`torch.cuda.max_memory_allocated` on CUDA. Only ratios taken in the same command mean anything here.

    python benchmarks/angle_scoring.py --limit 64 --repeats 3
    python benchmarks/angle_scoring.py --parts scaling --lengths 128,256,512,1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import git_describe, proc_status_kb  # benchmarks/ is on sys.path when a script runs

# Spinning OpenMP workers turn a 2-thread forward ~13x slower when another process holds one of the 2
# cores (measured: 5.2 s vs 0.40 s for a 160-token forward); passive waiting removes that. It must be
# set before torch loads its OpenMP runtime, and the memory children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# GSM8K train from the hub (the rows every recorded figure used); offline: --data data/eval/gsm8k_test.jsonl
DEFAULT_DATA = "openai/gsm8k:main:train"
METHODS = ("reference", "ours", "limit")


class _Stop(Exception):
    """Raised by the limit's hook: leave the forward as soon as the target site's input exists."""


@dataclass
class Setup:
    """What every method needs: the model, its tokenizer, the target module and the device."""

    model: torch.nn.Module
    tokenizer: object
    body: torch.nn.Module
    target: torch.nn.Module
    device: torch.device
    args: argparse.Namespace


# ------------------------------------------------------------------------------------------- set-up
def load_setup(args: argparse.Namespace) -> Setup:
    from gainrl_pl.models import load_model, load_tokenizer
    from gainrl_pl.scoring import find_decoder_layers

    device = torch.device(args.device)
    model = load_model(None, dtype=args.dtype).to(device).eval()
    tokenizer = load_tokenizer(None)
    layers = find_decoder_layers(model)
    # The body is whatever module owns the decoder-layer list (LlamaModel here), found without a name.
    body = next(m for m in model.modules() if getattr(m, "layers", None) is layers)
    block = layers[args.layer]
    target = block.mlp if args.site == "mlp_input" else block
    return Setup(model, tokenizer, body, target, device, args)


def gsm8k_prompts(tokenizer, path: str, limit: int) -> list:
    """The first `limit` GSM8K training questions, rendered with the `paper` prompt preset."""
    from gainrl_pl.data import build_examples, load_rows
    from gainrl_pl.data.prompts import build_prompt, get_prompt_template

    examples, _ = build_examples(load_rows(path), "gsm8k")
    template = get_prompt_template("paper")
    return [build_prompt(tokenizer, ex.question, template) for ex in examples[:limit]]


def synthetic_prompts(tokenizer, path: str, length: int, count: int) -> list:
    """`count` paper-preset prompts of about `length` tokens each; the question is a slice of
    concatenated GSM8K questions (distinct slices, so no two prompts are equal)."""
    from gainrl_pl.data import build_examples, load_rows
    from gainrl_pl.data.prompts import build_prompt, get_prompt_template

    template = get_prompt_template("paper")
    overhead = build_prompt(tokenizer, "x", template).num_tokens - 1
    if length <= overhead + 8:
        raise SystemExit(f"--lengths: {length} tokens leaves no room for a question (the paper preset alone "
                         f"takes {overhead}); use lengths >= {overhead + 16}")
    examples, _ = build_examples(load_rows(path), "gsm8k")
    pool = tokenizer(" ".join(ex.question for ex in examples[:2000]), add_special_tokens=False)["input_ids"]
    want = length - overhead
    out = []
    for i in range(count):
        start = i * want
        question = tokenizer.decode(pool[start:start + want])
        out.append(build_prompt(tokenizer, question, template))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- methods
def run_reference(s: Setup, prompts: list) -> list[float]:
    """One prompt at a time, full forward with all hidden states, an L x L cosine matrix per prompt."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output=None):
        # pass-through: the forward goes on to the LM head, as in the reference script
        captured.append(args[0] if output is None else (output[0] if isinstance(output, tuple) else output))

    handle = (s.target.register_forward_pre_hook(keep) if s.args.site == "mlp_input"
              else s.target.register_forward_hook(keep))
    scores = []
    try:
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p.input_ids], device=s.device)
                s.model(input_ids=ids, output_hidden_states=True, use_cache=False)
                x = captured.pop()[0].float()
                u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                cos = u @ u.T  # the L x L matrix
                (q0, q1), (p0, p1) = p.question, p.prefix
                intra = cos[q0:q1, q0:q1].mean()  # diagonal included, as the paper's 1/n_Q^2
                inter = cos[q0:q1, p0:p1].mean()
                scores.append(float(s.args.w_intra * intra + s.args.w_inter * inter))
    finally:
        handle.remove()
    _sync(s.device)
    return scores


def run_ours(s: Setup, prompts: list) -> list[float]:
    from gainrl_pl.scoring import AngleScorer

    scorer = AngleScorer(s.model, s.tokenizer, layer=s.args.layer, site=s.args.site, batch_size=s.args.batch_size,
                         w_intra=s.args.w_intra, w_inter=s.args.w_inter, show_progress=False)
    scores = [r.score for r in scorer.score(prompts)]
    _sync(s.device)
    return scores


def prepare_limit(s: Setup, prompts: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted, padded batches on the device, built before the clock starts."""
    from gainrl_pl.models import position_ids_from_mask

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    batches = []
    for lo in range(0, len(order), s.args.batch_size):
        ids = [prompts[i].input_ids for i in order[lo:lo + s.args.batch_size]]
        padded = s.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        mask = padded["attention_mask"].to(s.device)
        positions = position_ids_from_mask(mask)  # as the scorer does
        batches.append((padded["input_ids"].to(s.device), mask, positions))
    return batches


def run_limit(s: Setup, batches) -> None:
    """The body's forward up to the target site, nothing else: no scoring, no padding, no masks."""
    def stop(*_):
        raise _Stop

    handle = (s.target.register_forward_pre_hook(stop) if s.args.site == "mlp_input"
              else s.target.register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for ids, mask, positions in batches:
                try:
                    s.body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    _sync(s.device)


def run_method(s: Setup, method: str, prompts: list, limit_batches=None):
    if method == "reference":
        return run_reference(s, prompts)
    if method == "ours":
        return run_ours(s, prompts)
    return run_limit(s, limit_batches if limit_batches is not None else prepare_limit(s, prompts))


# ------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Rise of peak memory over the level at `reset()`: VmHWM on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        # "5" resets the peak RSS to the current RSS (Linux >= 4.0); ru_maxrss follows it
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = proc_status_kb("VmRSS") * 1024

    def rise_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (proc_status_kb("VmHWM") * 1024 - self.base) / 2**20


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess body: one method, one pass per prompt set, peak rise per set, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    s = load_setup(args)
    if args.child_kind == "gsm8k":
        sets = {"gsm8k": gsm8k_prompts(s.tokenizer, args.data, args.limit)}
    else:
        sets = {str(n): synthetic_prompts(s.tokenizer, args.data, n, args.scaling_prompts) for n in args.lengths}
    meter = PeakMemory(s.device)
    # Warm up on one short prompt first: the first forward page-faults the memory-mapped weights
    # (~540 MB in fp32), which would otherwise count as the method's own memory.
    shortest = min((p for ps in sets.values() for p in ps), key=lambda p: p.num_tokens)
    run_method(s, args.child, [shortest])
    out = {}
    for name, prompts in sets.items():  # ascending lengths, so a missed reset could only under-report
        batches = prepare_limit(s, prompts) if args.child == "limit" else None
        meter.reset()
        run_method(s, args.child, prompts, batches)
        out[name] = meter.rise_mb()
    print("RESULT " + json.dumps(out))


def measure_memory(args: argparse.Namespace, kind: str) -> dict[str, dict[str, float]]:
    """Run each method's memory child in turn (never two at once: they would share the 2 cores)."""
    results = {}
    for method in METHODS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--child-kind", kind,
               *_forward_args(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory child {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[method] = json.loads(line[len("RESULT "):])
    return results


def _forward_args(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--limit", str(args.limit), "--layer", str(args.layer), "--site", args.site,
            "--threads", str(args.threads), "--data", args.data, "--w-intra", str(args.w_intra),
            "--w-inter", str(args.w_inter), "--lengths", ",".join(map(str, args.lengths)),
            "--scaling-prompts", str(args.scaling_prompts)]


# ------------------------------------------------------------------------------------------- timing
def interleaved_times(s: Setup, prompts: list, repeats: int, methods=METHODS):
    """Seconds per chunk for each method, as `times[method][repeat][chunk]`, and the scores of the first
    repeat as `scores[method][i]` for prompt i (reference and ours; the limit scores nothing).

    The prompts are cut into the length-sorted chunks of `batch_size` that ours and the limit would
    batch anyway; every chunk is run by all methods back to back, the order rotating from one chunk to
    the next. A burst of load from other jobs then lands on all methods within seconds of each other,
    and the per-chunk ratios are paired measurements.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    bs = s.args.batch_size
    chunks = [[prompts[i] for i in order[lo:lo + bs]] for lo in range(0, len(order), bs)]
    prepared = [prepare_limit(s, c) for c in chunks]
    for method in methods:  # first calls pay for page-faulting the weights, thread start-up, allocator growth
        run_method(s, method, chunks[-1][-1:])
    times = {m: [[0.0] * len(chunks) for _ in range(repeats)] for m in methods}
    scores: dict[str, list[float | None]] = {m: [None] * len(prompts) for m in methods}
    turn = 0
    for r in range(repeats):
        for c, (chunk, batches) in enumerate(zip(chunks, prepared, strict=True)):
            for method in methods[turn % len(methods):] + methods[:turn % len(methods)]:
                t0 = time.perf_counter()
                values = run_method(s, method, chunk, batches)
                times[method][r][c] = time.perf_counter() - t0
                if r == 0 and values is not None:
                    for i, v in zip(order[c * bs:(c + 1) * bs], values, strict=True):
                        scores[method][i] = v
            turn += 1
    return times, scores


def _flat(per_repeat: list[list[float]]) -> list[float]:
    return [t for rep in per_repeat for t in rep]


def ratio_summary(num: list[list[float]], den: list[list[float]]) -> tuple[float, float, float]:
    """Total-time ratio over everything run, and the quartiles of the paired per-chunk ratios."""
    pairs = [a / b for a, b in zip(_flat(num), _flat(den), strict=True)]
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return sum(_flat(num)) / sum(_flat(den)), q[0], q[2]


def timing_part(s: Setup, args: argparse.Namespace) -> None:
    prompts = gsm8k_prompts(s.tokenizer, args.data, args.limit)
    lengths = [p.num_tokens for p in prompts]
    print(f"\n## GSM8K train, paper preset: {len(prompts)} prompts, {statistics.mean(lengths):.0f} tokens on average "
          f"({min(lengths)}-{max(lengths)}), layer {args.layer} {args.site}, batch {args.batch_size}, "
          f"{args.repeats} interleaved repeats")
    times, scores = interleaved_times(s, prompts, args.repeats)
    reference, ours = scores["reference"], scores["ours"]
    diff = max(abs(a - b) for a, b in zip(reference, ours, strict=True))
    same_order = sorted(range(len(ours)), key=lambda i: -ours[i]) == sorted(range(len(ours)),
                                                                              key=lambda i: -reference[i])
    print(f"scores agree: max |reference - ours| = {diff:.2e} (score range {min(ours):.4f}..{max(ours):.4f}); "
          f"same ranking: {same_order}")
    n = len(prompts)
    print("\n| method | prompts/s (all passes) | prompts/s per pass (min-max) |")
    print("| --- | --- | --- |")
    for m in METHODS:
        passes = [n / sum(rep) for rep in times[m]]
        print(f"| {m} | {n * args.repeats / sum(_flat(times[m])):.2f} | {min(passes):.2f}-{max(passes):.2f} |")
    speed, lo, hi = ratio_summary(times["reference"], times["ours"])
    print(f"\nours / reference throughput: {speed:.2f}x (paired per-chunk ratios, quartiles {lo:.2f}-{hi:.2f})")
    gap, lo, hi = ratio_summary(times["ours"], times["limit"])
    goal = 1.1 if s.device.type == "cpu" else None
    verdict = "" if goal is None else f"; goal <= {goal}x: {'met' if gap <= goal else 'NOT met'}"
    print(f"ours time / limit time: {gap:.3f}x (paired per-chunk quartiles {lo:.3f}-{hi:.3f}){verdict}")
    if s.device.type == "cuda":
        print(f"GPU goal ours >= 10x reference: {'met' if speed >= 10 else 'NOT met'}")

    if "memory" in args.parts:
        mem = measure_memory(args, "gsm8k")
        print("\n| method | peak memory rise (MB), separate process |")
        print("| --- | --- |")
        for m in METHODS:
            print(f"| {m} | {mem[m]['gsm8k']:.0f} |")


def scaling_part(s: Setup, args: argparse.Namespace) -> None:
    cfg = s.model.config
    print(f"\n## Scaling with prompt length: {args.scaling_prompts} synthetic paper-preset prompts per length, "
          f"{args.repeats} interleaved repeats")
    rows = []
    for length in args.lengths:
        prompts = synthetic_prompts(s.tokenizer, args.data, length, args.scaling_prompts)
        times, _ = interleaved_times(s, prompts, args.repeats)
        rows.append((length, statistics.mean(p.num_tokens for p in prompts), times))
    mem = measure_memory(args, "scaling") if "memory" in args.parts else None
    elt = torch.finfo(torch.float32).bits // 8
    print("\n| tokens | reference s/prompt | ours s/prompt | limit s/prompt | ours/ref speed-up | ours/limit time | "
          "L x L matrix MB | ref hidden states + logits MB | ref peak rise MB | ours peak rise MB | limit peak rise MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for length, actual, times in rows:
        per = {m: sum(_flat(times[m])) / (args.repeats * args.scaling_prompts) for m in METHODS}
        speed = ratio_summary(times["reference"], times["ours"])[0]
        gap = ratio_summary(times["ours"], times["limit"])[0]
        matrix = actual**2 * elt / 2**20
        # what output_hidden_states + full logits keep alive for one prompt (model dtype)
        dsize = torch.empty((), dtype=s.model.dtype).element_size()
        kept = actual * ((cfg.num_hidden_layers + 1) * cfg.hidden_size + cfg.vocab_size) * dsize / 2**20
        m = ["-"] * 3 if mem is None else [f"{mem[k][str(length)]:.0f}" for k in METHODS]
        print(f"| {actual:.0f} | {per['reference']:.3f} | {per['ours']:.3f} | {per['limit']:.3f} | {speed:.2f}x | "
              f"{gap:.3f}x | {matrix:.2f} | {kept:.0f} | {m[0]} | {m[1]} | {m[2]} |")


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 / bfloat16 / float16")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward for ours and the limit")
    p.add_argument("--limit", type=int, default=64, help="GSM8K prompts to score")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed passes per method")
    p.add_argument("--layer", type=int, default=-1, help="scoring layer (the scheduler's default: -1)")
    p.add_argument("--site", default="mlp_input", choices=("mlp_input", "layer_output"))
    p.add_argument("--w-intra", type=float, default=1.0)
    p.add_argument("--w-inter", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the shared CPU has 2 cores)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K rows: a hub id or a local JSONL file")
    p.add_argument("--parts", default="timing,memory,scaling",
                   help="comma list of: timing (GSM8K throughput + score check), memory, scaling")
    p.add_argument("--lengths", default="128,256,512,1024", help="total prompt lengths for the scaling part")
    p.add_argument("--scaling-prompts", type=int, default=4, help="prompts per length in the scaling part")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--child-kind", choices=("gsm8k", "scaling"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    s = load_setup(args)
    print(f"# {git_describe()}")
    print(f"# angle scoring benchmark: built-in SmolLM2-135M-Instruct, {args.dtype}, {s.device}, "
          f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    if "timing" in args.parts:
        timing_part(s, args)
    if "scaling" in args.parts:
        scaling_part(s, args)


if __name__ == "__main__":
    main()
