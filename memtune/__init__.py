"""memtune: fit a PyTorch training run into a GPU memory budget at the highest throughput it can."""

__version__ = "0.1.0"

__all__ = ["__version__", "apply_plan"]


def __getattr__(name):
    # Lazy so that `memtune --version` does not import torch.
    if name == "apply_plan":
        from memtune.patcher import apply_plan

        return apply_plan
    raise AttributeError(name)
