"""Checkpoint I/O in the published Hugging Face layout for every model family (``checkpoint.py``
does the work; imported lazily because it reads the model classes)."""

from __future__ import annotations


class PublishedLayoutIO:
    """Mixed in before ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` read and write
    the published safetensors layout (sharded with an index), never pickles."""

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB", **kwargs):
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from .checkpoint import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, **kwargs)
