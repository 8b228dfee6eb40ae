"""lm-evaluation-harness with the ``diffmoe`` model: generation scored by lm-eval equals the
platform's own scorer on the same prompts, loglikelihood ranks the right answer of a trained model
first far above chance (exact for the AR twin, Monte-Carlo ELBO for masked diffusion), and the Ray
job logs the metrics and samples to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffmoe.data import load_tokenizer
from diffmoe.diffusion import ObjectiveConfig, training_loss
from diffmoe.generation.tasks import ReverseTask, make_examples, score, write_char_tokenizer
from diffmoe.model import LLaDAMoEModelLM, named_config

lm_eval = pytest.importorskip("lm_eval")


def test_builtin_lookup_tasks_have_three_distinct_wrong_choices(tmp_path):
    from diffmoe.harness.tasks import write_builtin_tasks

    # one key per prompt: two-letter answers, some of them a repeated letter ("aa")
    out = write_builtin_tasks(tmp_path, "lookup", 200, 3, min_digits=2, max_digits=2)
    rows = [json.loads(line) for line in (out / "diffmoe_lookup_mc.jsonl").read_text().splitlines()]
    assert any(r["choices"][r["label"]][0] == r["choices"][r["label"]][1] for r in rows)
    for r in rows:
        answer = r["choices"][r["label"]]
        assert len(set(r["choices"])) == 4 and all(len(c) == len(answer) == 2 for c in r["choices"])


TASK = ReverseTask(min_digits=1, max_digits=3)
SEQ = 12


def _train(out: Path, causal: bool, steps: int) -> Path:
    """A tiny model trained in-process on raw ``prompt answer <eos>`` rows of the task."""
    write_char_tokenizer(out)
    tok, special = load_tokenizer(out)
    torch.manual_seed(0)
    config = named_config(
        "tiny",
        vocab_size=len(tok),
        mask_token_id=special.mask_id,
        eos_token_id=special.eos_id,
        pad_token_id=special.eos_id,
        causal=causal,
    )
    model = LLaDAMoEModelLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = make_examples(TASK, steps * 32, seed=1)
    obj = ObjectiveConfig(aux_loss_coef=0.0, z_loss_coef=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = examples[step * 32 : (step + 1) * 32]
        ids = torch.full((32, SEQ), special.eos_id)
        response = torch.zeros(32, SEQ, dtype=torch.bool)
        for i, ex in enumerate(batch):
            p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            a = tok(ex.answer, add_special_tokens=False)["input_ids"]
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            response[i, len(p) :] = True
        loss = training_loss(
            model, ids, mask_id=special.mask_id, objective=obj, response_mask=response, generator=gen
        )
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    model.eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from diffmoe.harness.tasks import write_builtin_tasks

    return write_builtin_tasks(tmp_path_factory.mktemp("tasks"), "reverse", 48, 7, min_digits=1, max_digits=3)


def _evaluate(model_dir: Path, tasks: list[str], task_dir: Path, mc_num: int = 4):
    from lm_eval.tasks import TaskManager

    from diffmoe.harness.lm import DiffmoeLM

    lm = DiffmoeLM(
        str(model_dir), mc_num=mc_num, decoding={"gen_length": 8, "block_length": 8, "threshold": 0.9}
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    return lm, out


def test_generation_score_equals_the_platform_scorer_and_ar_ranks_the_answer(tmp_path, task_dir):
    model_dir = _train(tmp_path / "ar", causal=True, steps=300)
    lm, out = _evaluate(model_dir, ["diffmoe_reverse", "diffmoe_reverse_mc"], task_dir)
    rows = [json.loads(x) for x in (task_dir / "diffmoe_reverse.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["diffmoe_reverse"], key=lambda s: s["doc_id"])
    # the platform's own evaluation of the same prompts: Engine answers, tasks.score
    examples = make_examples(TASK, 48, seed=7)
    assert [ex.prompt for ex in examples] == [r["prompt"] for r in rows]
    ours = lm.engine.run([lm.tok_encode(ex.prompt) for ex in examples], lm.decoding_for({"max_gen_toks": 5}))
    assert [s["resps"][0][0] for s in samples] == [o.text for o in ours]
    reported = out["results"]["diffmoe_reverse"]["exact_match,none"]
    assert reported == pytest.approx(score(examples, [o.text for o in ours])["accuracy"])
    assert reported > 0.5  # a trained model, not a vacuous 0 == 0
    assert out["results"]["diffmoe_reverse_mc"]["acc,none"] > 0.6  # chance: 0.25


def test_masked_diffusion_loglikelihood_ranks_the_answer_above_chance(tmp_path, task_dir):
    model_dir = _train(tmp_path / "mdlm", causal=False, steps=300)
    _, out = _evaluate(model_dir, ["diffmoe_reverse_mc"], task_dir, mc_num=8)
    assert out["results"]["diffmoe_reverse_mc"]["acc,none"] > 0.45  # chance: 0.25


def test_job_logs_every_task_metric_and_the_samples_to_mlflow(ray_cluster, tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from diffmoe.harness.job import LmEvalConfig, LmEvalError, evaluate_with_lm_eval
    from diffmoe.tracking import MLflowSection, create_run, register_model

    # a registered version, evaluated through its alias: the scores land on that version too
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    section = MLflowSection(tracking_uri=uri, experiment="tests")
    client, train_run = create_run(section, run_name="train")
    client.log_artifacts(train_run, str(tiny_model_dir), "model")
    version = register_model(client, train_run, "model", "tiny-lm", "candidate")
    cfg = LmEvalConfig.model_validate(
        {
            "model": "models:/tiny-lm@candidate",
            "limit": 3,
            "builtin": {"examples": 8},
            "mc_num": 1,
            "mlflow": {"tracking_uri": uri, "experiment": "tests"},
        }
    )
    result = evaluate_with_lm_eval(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    assert {"lm_eval/diffmoe_reverse/exact_match", "lm_eval/diffmoe_reverse_mc/acc"} <= set(run.data.metrics)
    assert (
        run.data.tags["kind"] == "lm_eval" and run.data.tags["evaluated_model"] == "models:/tiny-lm@candidate"
    )
    assert run.data.tags["evaluated_model_version"] == f"models:/tiny-lm/{version}"
    tags = client.get_model_version("tiny-lm", version).tags
    assert tags["lm_eval_run_id"] == result["run_id"]
    assert float(tags["lm_eval/diffmoe_reverse_mc/acc"]) == run.data.metrics["lm_eval/diffmoe_reverse_mc/acc"]
    files = {a.path for a in client.list_artifacts(result["run_id"], "lm_eval")}
    assert {"lm_eval/results.json", "lm_eval/samples_diffmoe_reverse.jsonl"} <= files
    with pytest.raises(LmEvalError, match="unknown"):
        evaluate_with_lm_eval(cfg.model_copy(update={"tasks": ["no_such_task"]}))


def test_lm_evals_own_models_stay_registered_beside_ours():
    """lm-eval fills its model registry on first lookup only while it is empty: registering
    ``diffmoe`` first must not hide ``local-completions`` and the rest."""
    from lm_eval.api.registry import get_model

    from diffmoe.harness.lm import DiffmoeLM

    assert get_model("diffmoe") is DiffmoeLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_task_settings_are_read_as_lm_evals_hf_model_reads_them(tiny_model_dir, tmp_path):
    """max_gen_toks (or an alias) caps the answer; a temperature implies sampling; configured steps
    keep their rate; a context's trailing spaces go to the continuation; a gen_prefix is continued;
    a block-diffusion model keeps its trained block."""
    from diffmoe.bench.tiny_model import make_tiny_model_dir
    from diffmoe.harness.lm import DiffmoeLM

    lm = DiffmoeLM(str(tiny_model_dir), decoding={"gen_length": 32, "block_length": 8, "steps": 16})
    d = lm.decoding_for({"max_gen_toks": 20, "until": ["\n"]})
    assert (d.gen_length, d.block_length, d.max_tokens, d.steps, d.stop) == (24, 8, 20, 12, ["\n"])
    assert lm.decoding_for({"max_new_tokens": 5}).max_tokens == 5
    assert lm.decoding_for({"temperature": 0.7}).temperature == 0.7
    assert lm.decoding_for({"temperature": 0.7, "do_sample": False}).temperature == 0.0
    sampled = lm.decoding_for({"do_sample": True, "top_p": 0.9, "top_k": 0})
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (1.0, 0.9, None)
    context, continuation = lm._encode_pair("Question: 2+2= ", "4")
    assert context == lm.tok_encode("Question: 2+2=")
    assert context + continuation == lm.tok_encode("Question: 2+2= 4")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Answer:"}]
    assert lm.apply_chat_template(chat, add_generation_prompt=False).endswith("Answer:")
    blocks = DiffmoeLM(
        str(make_tiny_model_dir(tmp_path / "llada2", family="llada2")), decoding={"threshold": 0.9}
    )
    short = blocks.decoding_for({"max_gen_toks": 5})
    assert (short.block_length, short.gen_length, short.max_tokens) == (32, 32, 5)
