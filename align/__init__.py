"""moealign: Llama 4 style post-training for Mixture-of-Experts models."""

__version__ = "0.1.0"
