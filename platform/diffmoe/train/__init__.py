"""Ray Train + DeepSpeed masked-diffusion training."""
