"""The platform's checkable tasks as lm-eval tasks over local JSONL files (works offline).

``diffmoe_<task>``: generate the answer to a held-out prompt, exact match (``generate_until``).
``diffmoe_<task>_mc``: pick the right answer among the true one and three corrupted ones
(``loglikelihood``; 25% is chance). Prompts are the bare task strings; with lm-eval's
``apply_chat_template`` they are rendered in the model's chat template, as the SFT rows were.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from diffmoe.generation.tasks import TASKS, make_examples

GENERATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

CHOICE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same length: one character changed (a digit for a digit, a letter for
    anything else), or two swapped."""
    chars = list(answer)
    i = rng.randrange(len(chars))
    if len(chars) > 1 and rng.random() < 0.5:
        j = (i + 1) % len(chars)
        chars[i], chars[j] = chars[j], chars[i]
    if "".join(chars) == answer:
        if chars[i].isdigit():
            chars[i] = str((int(chars[i]) + rng.randrange(1, 10)) % 10)
        else:  # 25 other letters: a short answer such as "aa" still has three distinct wrong ones
            chars[i] = rng.choice([c for c in string.ascii_lowercase if c != chars[i]])
    return "".join(chars)


def write_builtin_tasks(
    out: Path, task: str = "reverse", examples: int = 64, seed: int = 12345, **task_args
) -> Path:
    """``out`` as an lm-eval ``include_path``: the generation and multiple-choice tasks of ``task``
    (``diffmoe.generation.tasks``), ``examples`` held-out prompts drawn with ``seed``."""
    out.mkdir(parents=True, exist_ok=True)
    task_obj = TASKS[task](**task_args)
    exs = make_examples(task_obj, examples, seed=seed)
    rng = random.Random(seed)
    gen_rows, mc_rows = [], []
    for ex in exs:
        gen_rows.append({"prompt": ex.prompt, "answer": ex.answer})
        wrong: list[str] = []
        while len(wrong) < 3:
            cand = _corrupt(ex.answer, rng)
            if cand != ex.answer and cand not in wrong:
                wrong.append(cand)
        choices = [ex.answer, *wrong]
        rng.shuffle(choices)
        mc_rows.append({"prompt": ex.prompt, "choices": choices, "label": choices.index(ex.answer)})
    for name, rows in ((f"diffmoe_{task}", gen_rows), (f"diffmoe_{task}_mc", mc_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_tokens = task_obj.max_answer_chars + 2  # the answer, then the end marker
    (out / f"diffmoe_{task}.yaml").write_text(
        GENERATE.format(name=f"diffmoe_{task}", data=out / f"diffmoe_{task}.jsonl", max_tokens=max_tokens)
    )
    (out / f"diffmoe_{task}_mc.yaml").write_text(
        CHOICE.format(name=f"diffmoe_{task}_mc", data=out / f"diffmoe_{task}_mc.jsonl")
    )
    return out
