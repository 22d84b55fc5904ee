"""hydragpt: Hydra-configured training, sweeping, evaluation and sampling of GPT-style language models."""

__version__ = "0.1.0"
