"""hvpmtl: HVP-MTL multi-task vision pre-training."""
__version__ = "0.1.0"
