"""``train.check``: exact match on a checkable task, measured inside the run, so a run can stop at
quality without pausing (a pause costs a Ray Train start-up, a restore and an export each time).

Each worker decodes its share of the prompts (every ``world``-th) with the serving ``Engine`` on the
model being trained, in eval mode, and the correct/total counts are summed over the workers: every
rank gets the same accuracy and takes the same decision. Expert parallelism is refused by the
config: its all-to-all would need every rank to run the same forwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from diffmoe.data import load_tokenizer
from diffmoe.data.tokenizer import end_of_turn_ids
from diffmoe.generation import task_check
from diffmoe.generation.tasks import make_examples

from .config import CheckSection


class QualityCheck:
    def __init__(self, section: CheckSection, tokenizer_dir: Path, rank: int, world: int):
        self.section = section
        self.tokenizer, self.special = load_tokenizer(tokenizer_dir)
        task = task_check.make_task(section.task, section.min_digits, section.max_digits)
        self.examples = make_examples(task, section.prompts, section.seed)[rank::world]
        self.prompts = task_check.chat_prompts(self.tokenizer, self.examples)
        longest = max(map(len, self.prompts), default=0)
        if longest >= section.seq_len:
            raise ValueError(
                f"train.check.seq_len={section.seq_len} leaves no answer canvas after a prompt of "
                f"{longest} tokens (seq_len is prompt + answer: the dataset's row length)"
            )
        stops = end_of_turn_ids(self.tokenizer)
        self.configs = [
            task_check.answer_decoding(
                section.seq_len,
                len(p),
                stops,
                threshold=section.threshold,
                cache=section.cache,
                block_length=section.block_length,
            )
            for p in self.prompts
        ]

    def due(self, step: int, max_steps: int) -> bool:
        """Every ``every`` steps, and at the last step (the curve ends where the run does)."""
        return bool(self.section.every) and (step % self.section.every == 0 or step == max_steps)

    def accuracy(self, model, device) -> float:
        """Exact match over all workers' prompts (every rank returns the same value)."""
        was_training = model.training
        try:
            result = task_check.engine_accuracy(
                model,
                self.tokenizer,
                self.special,
                self.examples,
                self.prompts,
                self.configs,
                self.section.max_batch_size,
            )
        finally:
            model.train(was_training)
        counts = torch.tensor([result["correct"], result["total"]], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        return float(counts[0] / counts[1].clamp_min(1))
