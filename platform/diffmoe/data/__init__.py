"""Corpus pipeline: raw text, JSONL or Parquet -> tokenized, packed, checksummed Parquet shards.

Training jobs read only what this package writes, through ``verify_dataset`` / ``read_split``.
"""

from diffmoe.data.config import CorpusConfig, TokenizerConfig, TrainTokenizerConfig
from diffmoe.data.manifest import DatasetError, Manifest, read_split, verify_dataset
from diffmoe.data.pipeline import prepare, prepare_corpus, summary
from diffmoe.data.sources import InputError
from diffmoe.data.tokenizer import SpecialIds, TokenizerError, load_tokenizer, tokenizer_hash, train_bpe

__all__ = [
    "CorpusConfig",
    "DatasetError",
    "InputError",
    "Manifest",
    "SpecialIds",
    "TokenizerConfig",
    "TokenizerError",
    "TrainTokenizerConfig",
    "load_tokenizer",
    "prepare",
    "prepare_corpus",
    "read_split",
    "summary",
    "tokenizer_hash",
    "train_bpe",
    "verify_dataset",
]
