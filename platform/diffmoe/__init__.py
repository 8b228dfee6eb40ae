"""diffmoe: train and serve Mixture-of-Experts masked-diffusion language models on Ray."""

__version__ = "0.1.0"
