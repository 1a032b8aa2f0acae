"""The demo config's rollout and loss on a fixed seed equal values recorded before the package was reorganised.

Issue 16 moved files into folders (schedules/, rewards/, evaluation/, data/) and thinned `GRPOModule`; none of
it may change what a training step computes. This test runs `configs/demo.yaml` through the real CLI (tiny
model, two steps, fp32 so that the values do not depend on the CPU's bf16 kernels) and compares the prompts
drawn, every completion's token ids, the rewards, the advantages, the policy's log-probs, the loss and the
gradient norm with
`tests/layout_equivalence.json`, recorded at the commit before the reorganisation.

Regenerate the fixture only for an intended behaviour change: `GAINRL_RECORD_EQUIVALENCE=1 pytest tests/test_layout_equivalence.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from shipped_configs import REPO, cpu_swaps

import gainrl_pl.module as module_file
from gainrl_pl.cli import run_lightning_cli
from gainrl_pl.grpo import policy_loss
from gainrl_pl.module import GRPOModule

FIXTURE = Path(__file__).with_name("layout_equivalence.json")


def test_demo_rollout_and_loss_match_the_recorded_values(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAINRL_PL_CACHE", str(tmp_path / "cache"))
    steps: list[dict] = []
    rollout, advantages = GRPOModule._rollout, module_file.compute_advantages

    def recording_rollout(self, batch):
        generated = rollout(self, batch)
        steps.append({"prompt_index": batch["index"].tolist(),
                      "completion_ids": generated.rollout.completion_ids.tolist(),
                      "completion_mask": generated.rollout.completion_mask.tolist(),
                      "rewards": generated.rewards.total.tolist()})
        return generated

    def recording_advantages(*args, **kwargs):
        out = advantages(*args, **kwargs)
        steps[-1]["advantages"] = out.reshape(-1).tolist()
        return out

    def recording_loss(*args, **kwargs):
        loss, metrics = policy_loss(*args, **kwargs)
        steps[-1].setdefault("losses", []).append(float(loss))
        steps[-1].setdefault("logp_sums", []).append(float(args[0].detach().sum()))  # the policy's forward
        return loss, metrics

    monkeypatch.setattr(GRPOModule, "_rollout", recording_rollout)
    monkeypatch.setattr(module_file, "compute_advantages", recording_advantages)
    monkeypatch.setattr(module_file, "policy_loss", recording_loss)
    config = REPO / "configs" / "demo.yaml"
    cli = run_lightning_cli(["fit", "--config", str(config), *cpu_swaps(config, tiny_model_dir, tmp_path, max_steps=2),
                             "--trainer.precision", "32-true", "--trainer.limit_val_batches", "0",
                             "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false"])
    assert len(steps) == 2 and all(len(s["losses"]) == 1 for s in steps)
    logged = cli.trainer.callback_metrics
    observed = {"steps": steps, "logged_loss": float(logged["train/loss"]),
                "logged_grad_norm": float(logged["train/grad_norm"])}  # the step's gradient, not only its loss

    if os.environ.get("GAINRL_RECORD_EQUIVALENCE") == "1":
        FIXTURE.write_text(json.dumps(observed, indent=None) + "\n")
        pytest.skip(f"recorded {FIXTURE.name}")
    recorded = json.loads(FIXTURE.read_text())
    for step, (got, want) in enumerate(zip(observed["steps"], recorded["steps"], strict=True)):
        for key in ("prompt_index", "completion_ids", "completion_mask"):
            assert got[key] == want[key], f"step {step}: {key} differs from the recorded run"
        for key in ("rewards", "advantages", "losses", "logp_sums"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {key} differ from the recorded run")
    for key in ("logged_loss", "logged_grad_norm"):
        assert observed[key] == pytest.approx(recorded[key], rel=1e-4, abs=1e-6), key
