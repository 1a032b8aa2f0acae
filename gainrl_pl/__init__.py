"""gainrl_pl: GAIN-RL data scheduling + GRPO fine-tuning of LLMs on PyTorch Lightning."""

__version__ = "0.1.0"
