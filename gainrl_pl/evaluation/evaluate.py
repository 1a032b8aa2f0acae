"""`gainrl-pl evaluate`: benchmark a base model, a LoRA adapter or a training checkpoint, as the paper does.

    gainrl-pl evaluate --benchmark gsm8k --limit 200 --output runs/eval/base            # built-in model
    gainrl-pl evaluate --checkpoint runs/demo/checkpoints/last.ckpt --benchmark gsm8k math500 --output runs/eval/demo
    gainrl-pl evaluate --adapter ADAPTER_DIR --num-samples 8 --temperature 0.6 --benchmark aime24 --output OUT
    gainrl-pl evaluate --model DIR --data my.jsonl --question-field q --answer-field a --output OUT
    gainrl-pl evaluate --benchmark gsm8k --answer-extraction flexible --output OUT    # last box, else last number
    torchrun --nproc-per-node 4 -m gainrl_pl.evaluation.evaluate --checkpoint X.ckpt --benchmark math500 --output OUT

Each benchmark gets `OUT/<benchmark>/` with `samples.jsonl` (one line per prompt, appended as it goes, so
a rerun resumes), `summary.json` and `summary.md`; `OUT/summary.md` tables every benchmark in OUT.
Answers are checked by the training reward (`rewards.AccuracyReward`, math-verify), reading each answer as
`--answer-extraction` says: `boxed` (default, the paper's rule: the last `\\boxed{}` only) or `flexible` (the
last `\\boxed{}`, else the last number), the same option as training's `model.answer_extraction`; summaries
record it. Decoding is greedy unless `--temperature` > 0; `--num-samples n` gives pass@1 and pass@n.
Statistics: `eval_results.summarize`. A `--data` file may hold chat-message prompts (TRL's conversational
format, e.g. `--question-field prompt`): they are rendered as they are, without the prompt preset.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from gainrl_pl.evaluation.backends import (
    BACKENDS,
    LazyBackend,
    ModelSpec,
    load_backend,
    resolve_eval_dtype,
    resolve_model_spec,
)
from gainrl_pl.evaluation.results import (
    check_run_config,
    collect_samples,
    markdown_table,
    remove_results,
    repair_tail,
    samples_path,
    summarize,
    write_json_atomic,
    write_summary,
)
from gainrl_pl.evaluation.sets import BENCHMARKS, load_benchmark
from gainrl_pl.rewards.answers import ANSWER_EXTRACTIONS, DEFAULT_ANSWER_EXTRACTION, check_answer_extraction


# ----------------------------------------------------------------------------------------------- sharding
def resolve_shard(shard_rank: int | None = None, num_shards: int | None = None) -> tuple[int, int, bool]:
    """(rank, number of shards, whether the shards share a torch.distributed group).

    Explicit `shard_rank`/`num_shards` win (independent processes: finish with a `--merge` run). Else an
    initialized torch.distributed group, else torchrun's RANK/WORLD_SIZE (a gloo group is created, so
    rank 0 can wait for the others and merge). Else one shard.
    """
    import torch.distributed as dist

    if shard_rank is not None or num_shards is not None:
        if shard_rank is None or num_shards is None or not 0 <= shard_rank < num_shards:
            raise ValueError(f"need 0 <= shard_rank < num_shards, got shard_rank={shard_rank}, "
                             f"num_shards={num_shards}")
        return shard_rank, num_shards, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "MASTER_ADDR" in os.environ:
        # gloo: barriers work on CPU and GPU machines alike; a long timeout because shards finish unevenly
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
        return dist.get_rank(), world, True
    return int(os.environ.get("RANK", 0)), world, False


def _barrier(shared: bool) -> None:
    if shared:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(model: str | None = None, *, adapter: str | None = None, checkpoint: str | None = None,
             benchmark: str | None = None, data: str | None = None, question_field: str | None = None,
             answer_field: str | None = None, output_dir: str | Path, limit: int | None = None,
             prompt: str = "paper", num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 512, batch_size: int = 16, dtype: str = "auto", backend: Any = "transformers",
             seed: int = 0, shard_rank: int | None = None, num_shards: int | None = None,
             merge_only: bool = False, overwrite: bool = False, progress: bool = True,
             answer_extraction: str = DEFAULT_ANSWER_EXTRACTION,
             chat_template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a model on one benchmark; write samples, `summary.json` and `summary.md` to `output_dir`.

    Args:
        model: Base model: directory, hub id, or None/`builtin`. With `adapter`/`checkpoint`: overrides the
            adapter's base model.
        adapter: peft LoRA adapter directory.
        checkpoint: Lightning checkpoint `X.ckpt` (evaluated through `X.hf/` beside it).
        benchmark: A preset in `eval_sets.BENCHMARKS`, or with `data` the name the results carry.
        data, question_field, answer_field: Any question/answer file instead of a preset.
        output_dir: Where samples and summaries go; rerunning into it resumes.
        limit: Evaluate the first `limit` examples only.
        prompt: Prompt preset (`paper`, `plain`, `none`; see `prompts.PROMPT_PRESETS`).
        num_samples: Completions per prompt (n of pass@n).
        temperature: 0 = greedy; > 0 samples (needed for num_samples > 1).
        top_p: Nucleus sampling threshold when sampling.
        max_new_tokens: Completion token limit.
        batch_size: Sequences (prompts x num_samples) per generate call.
        dtype: Weights dtype; `auto` = bfloat16 on GPU, float32 on CPU.
        backend: `transformers`, `vllm`, or a backend object from `load_backend` (reused across calls;
            it carries its model, so `model`/`adapter`/`checkpoint` are then ignored).
        seed: Sampling seed (shard R uses seed + R).
        shard_rank, num_shards: Evaluate every num_shards-th prompt from shard_rank into
            `samples.rank{R}.jsonl`; default from torchrun (see `resolve_shard`).
        merge_only: Generate nothing; summarize the samples all shards wrote.
        overwrite: Delete earlier samples in `output_dir` instead of resuming.
        progress: Show a progress bar with the running accuracy.
        answer_extraction: How answers are read: `boxed` (the last `\\boxed{}` only, the paper's rule) or
            `flexible` (the last `\\boxed{}`, else the last number); recorded in the summary.
        chat_template_kwargs: Extra chat-template variables (e.g. `{"enable_thinking": False}`), as in training's
            `data.chat_template_kwargs`.

    Returns:
        The summary (see `eval_results.summarize`); for a shard that does not merge, its own shard's.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_samples, max_new_tokens and batch_size must be >= 1")
    check_answer_extraction(answer_extraction)
    if temperature < 0 or (num_samples > 1 and temperature == 0):
        raise ValueError(f"num_samples={num_samples} needs temperature > 0 (greedy gives n identical answers); "
                         f"got temperature={temperature}")
    examples, source = load_benchmark(benchmark if benchmark in BENCHMARKS or data is None else None, data=data,
                                      question_field=question_field, answer_field=answer_field, limit=limit)
    name = benchmark or Path(source).stem
    spec = backend.spec if hasattr(backend, "spec") else resolve_model_spec(model, adapter, checkpoint)
    backend_name = backend if isinstance(backend, str) else backend.name
    # the dtype actually loaded, not `auto`: a resume on another machine must not mix fp32 and bf16 samples
    dtype_used = resolve_eval_dtype(dtype, backend) if isinstance(backend, str) else backend.dtype
    rank, world, shared = resolve_shard(shard_rank, num_shards)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = temperature > 0
    settings = {"model": spec.label, "benchmark": name, "data": source, "prompt": prompt,
                "num_samples": num_samples, "temperature": temperature, "top_p": top_p if sampling else None,
                "seed": seed if sampling else None, "max_new_tokens": max_new_tokens, "backend": backend_name,
                "dtype": dtype_used, "answer_extraction": answer_extraction,
                "chat_template_kwargs": chat_template_kwargs or None}
    overwrite = overwrite and not merge_only
    if overwrite:
        remove_results(out, rank, world)  # each shard its own file; shard 0 also what the shards share
    if rank == 0 or not shared:  # under torchrun rank 0 checks the directory, the others wait for it
        # results written before the option existed were scored the one way there was then: flexible
        check_run_config(out, settings, replace=overwrite, legacy={"answer_extraction": "flexible"})
    _barrier(shared)
    if not merge_only:
        _run_shard(examples, spec, backend, out, rank=rank, world=world, name=name, prompt=prompt,
                   num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, dtype=dtype, seed=seed, progress=progress, overwrite=overwrite,
                   answer_extraction=answer_extraction, chat_template_kwargs=chat_template_kwargs)
    _barrier(shared)
    header = {"model": spec.label, "benchmark": name, "data": source, "prompt": prompt,
              "decoding": "greedy" if not sampling else f"temperature={temperature}, top_p={top_p}",
              "max_new_tokens": max_new_tokens, "backend": backend_name, "dtype": dtype_used,
              "answer_extraction": answer_extraction}
    records = collect_samples(out)
    if merge_only or world == 1 or (shared and rank == 0):
        rows = [records[ex.index] for ex in examples if ex.index in records]
        summary = summarize(rows, num_samples=num_samples, expected=len(examples), **header)
        write_summary(out, summary)
        return summary
    mine = [records[ex.index] for i, ex in enumerate(examples) if i % world == rank and ex.index in records]
    return {**summarize(mine, num_samples=num_samples, **header), "shard": [rank, world]}


def _run_shard(examples, spec: ModelSpec, backend, out: Path, *, rank: int, world: int, name: str, prompt: str,
               num_samples: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
               dtype: str, seed: int, progress: bool, overwrite: bool, answer_extraction: str,
               chat_template_kwargs: dict[str, Any] | None = None) -> None:
    """Generate and score this shard's examples that have no record yet, appending to its samples file."""
    from tqdm.auto import tqdm

    from gainrl_pl.data.prompts import build_chat_prompt, build_prompt, get_prompt_template
    from gainrl_pl.rewards import AccuracyReward, extract_prediction

    accuracy_reward = AccuracyReward(answer_extraction)

    shard = [ex for i, ex in enumerate(examples) if i % world == rank]  # strided: every shard gets easy and hard
    # after --overwrite only this shard's own (now empty) file counts: other files may be stale leftovers
    # that shard 0 is about to delete
    done = {} if overwrite else collect_samples(out)
    pending = [ex for ex in shard if ex.index not in done]
    scores = [sum(done[ex.index]["correct"]) / num_samples for ex in shard if ex.index in done]
    if not pending:
        return
    owned = isinstance(backend, str)
    engine = load_backend(spec, backend, dtype=dtype, seed=seed + rank) if owned else backend
    try:
        template = get_prompt_template(prompt)
        prompts = [build_chat_prompt(engine.tokenizer, ex.messages, chat_template_kwargs=chat_template_kwargs)
                   if ex.messages is not None
                   else build_prompt(engine.tokenizer, ex.question, template, chat_template_kwargs=chat_template_kwargs)
                   for ex in pending]
        # longest first: similar lengths share a batch (little padding), and an out-of-memory error shows at once
        order = sorted(range(len(pending)), key=lambda i: -prompts[i].num_tokens)
        per_call = max(1, batch_size // num_samples)
        if temperature > 0:  # the same command draws the same samples (given the same batches)
            torch.manual_seed(seed + rank)
        path = samples_path(out, rank, world)
        repair_tail(path)
        bar = tqdm(total=len(shard), initial=len(scores), desc=name if world == 1 else f"{name} [{rank}/{world}]",
                   disable=not progress, dynamic_ncols=True)
        with open(path, "a", encoding="utf-8") as handle:
            for lo in range(0, len(order), per_call):
                chunk = order[lo:lo + per_call]
                outputs = engine.generate([prompts[i].input_ids for i in chunk], num_samples=num_samples,
                                          temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
                for i, completions in zip(chunk, outputs, strict=True):
                    ex, texts = pending[i], [c.text for c in completions]
                    # the training reward itself: same extraction, same math-verify check
                    rewards = accuracy_reward([prompts[i].text] * len(texts), texts, answer=[ex.answer] * len(texts))
                    correct = [bool(r) for r in rewards]
                    record = {"index": ex.index, "question": ex.question, "gold": ex.answer, "completions": texts,
                              "predictions": [extract_prediction(t, answer_extraction) for t in texts],
                              "correct": correct,
                              "lengths": [c.length for c in completions],
                              "truncated": [c.truncated for c in completions]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    scores.append(sum(correct) / len(correct))
                handle.flush()  # a killed run keeps every finished batch
                bar.update(len(chunk))
                bar.set_postfix(acc=f"{sum(scores) / len(scores):.3f}")
        bar.close()
    finally:
        if owned:
            engine.close()


# ----------------------------------------------------------------------------------------------- CLI
def write_combined_summary(output_dir: str | Path) -> str:
    """Table every `OUT/<benchmark>/summary.json` into `OUT/summary.md` and `OUT/summary.json`; return the table."""
    directory = Path(output_dir)
    summaries = [json.loads(p.read_text()) for p in sorted(directory.glob("*/summary.json"))]
    write_json_atomic(directory / "summary.json", summaries)
    table = markdown_table(summaries)
    (directory / "summary.md").write_text(table, encoding="utf-8")
    return table


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `gainrl-pl evaluate` argument parser."""
    from gainrl_pl.data.prompts import PROMPT_PRESETS

    p = argparse.ArgumentParser(prog="gainrl-pl evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate (default: the built-in SmolLM2-135M-Instruct)")
    src.add_argument("--model", default=None, help="base model: directory, hub id or `builtin`; with "
                     "--adapter/--checkpoint it overrides the adapter's base")
    src.add_argument("--adapter", default=None, help="peft LoRA adapter directory")
    src.add_argument("--checkpoint", default=None, help="training checkpoint X.ckpt (uses X.hf/ beside it)")
    ds = p.add_argument_group("data")
    ds.add_argument("--benchmark", nargs="+", default=None,
                    help=f"presets: {', '.join(f'{k} ({v.description})' for k, v in BENCHMARKS.items())}. "
                    "With --data: the name results carry (default: the file name). Default: gsm8k")
    ds.add_argument("--data", default=None, help="any question/answer file instead of a preset")
    ds.add_argument("--question-field", default=None, help="question column of --data (default: question)")
    ds.add_argument("--answer-field", default=None, help="answer column of --data (default: answer)")
    ds.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", default="paper", choices=list(PROMPT_PRESETS), help="prompt preset")
    gen.add_argument("--chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                     help='extra chat-template variables as a JSON object, e.g. \'{"enable_thinking": false}\'')
    gen.add_argument("--answer-extraction", default=DEFAULT_ANSWER_EXTRACTION, choices=list(ANSWER_EXTRACTIONS),
                     help="how answers are read: boxed = the last \\boxed{} only (the paper's rule, default); "
                     "flexible = the last \\boxed{}, else the last number (training's model.answer_extraction)")
    gen.add_argument("--num-samples", type=int, default=1, help="completions per prompt (pass@n)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    gen.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    gen.add_argument("--backend", default="transformers", choices=BACKENDS, help="vllm: needs vllm and a GPU")
    gen.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("output and sharding")
    run.add_argument("--output", required=True, help="results directory (OUT/<benchmark>/...); reruns resume")
    run.add_argument("--shard-rank", type=int, default=None, help="this process's shard (default: torchrun's RANK)")
    run.add_argument("--num-shards", type=int, default=None, help="number of shards (default: WORLD_SIZE)")
    run.add_argument("--merge", action="store_true", help="generate nothing: summarize what the shards wrote")
    run.add_argument("--overwrite", action="store_true", help="delete earlier samples instead of resuming")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gainrl-pl evaluate` (see the module docstring)."""
    args = build_parser().parse_args(argv)
    names = args.benchmark or ([None] if args.data else ["gsm8k"])
    if args.data and len(names) > 1:
        raise SystemExit("with --data, --benchmark takes one name (the name results carry)")
    rank, world, shared = resolve_shard(args.shard_rank, args.num_shards)
    # one lazily loaded model for all benchmarks: none at all if every benchmark is already done
    engine = LazyBackend(resolve_model_spec(args.model, args.adapter, args.checkpoint), args.backend, args.dtype,
                         args.seed + rank)
    try:
        for name in names:
            stem = name or Path(args.data).stem
            summary = evaluate(
                benchmark=name, data=args.data, question_field=args.question_field, answer_field=args.answer_field,
                output_dir=Path(args.output) / stem, limit=args.limit, prompt=args.prompt,
                num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype, backend=engine,
                seed=args.seed, shard_rank=args.shard_rank, num_shards=args.num_shards, merge_only=args.merge,
                overwrite=args.overwrite, progress=not args.no_progress, answer_extraction=args.answer_extraction,
                chat_template_kwargs=args.chat_template_kwargs)
            if "shard" not in summary and summary.get("missing"):
                print(f"warning: {summary['missing']} prompts of {stem} have no samples yet (a shard has not run?)")
    finally:
        engine.close()
    if args.merge or world == 1 or (shared and rank == 0):
        print(write_combined_summary(args.output))
    elif not shared:
        print(f"shard {rank}/{world} done; when every shard is, run the same command with --merge")
    if shared:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
