"""Budget forcing inside lm-evaluation-harness: the ``t0s1`` model, the ``t0s1_*`` tasks, ``t0s1 lm-eval``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from t0s1 import BudgetForcing, generate  # noqa: E402
from t0s1.backends import Backend  # noqa: E402
from t0s1.backends.engine import EngineBackend  # noqa: E402
from t0s1.errors import UserError  # noqa: E402
from t0s1.evaluation.runner import EvalConfig, run_eval  # noqa: E402
from t0s1.evaluation.tasks import TASKS, get_task  # noqa: E402
from t0s1.lm_eval import TASKS_DIR, T0S1LM, task_manager  # noqa: E402
from t0s1.lm_eval.tasks.utils import load_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["What is 12 + 35 * 2?", "How many r are in raspberry?", "Wait, let me count"]


def _request(context, gen_kwargs, *, doc_id=0, task="demo", repeats=1):
    return Instance("generate_until", {}, (context, gen_kwargs), 0, metadata=(task, doc_id, repeats))


def _harness(model, prompts, gen_kwargs):
    return model.generate_until([_request(p, dict(gen_kwargs), doc_id=i) for i, p in enumerate(prompts)])


def _turn(lm, result, answer=None):
    return lm.profile.assistant_content(result.thinking, result.answer if answer is None else answer)


class CountingBackend(EngineBackend):
    """The engine, counting the prompts it is asked to generate."""

    def __init__(self, lm):
        super().__init__(lm)
        self.prompts = []

    def generate(self, prompts, budgets):
        self.prompts += list(prompts)
        return super().generate(prompts, budgets)


class ClientBackend(Backend):
    """A backend that is not the engine (as vllm and openai are): it only generates."""

    name = "openai"

    def __init__(self, lm):
        self.lm_for_test = lm
        self.forcing = SimpleNamespace(tokenizer=lm.tokenizer, profile=lm.profile)

    def generate(self, prompts, budgets):
        return generate(self.lm_for_test, list(prompts), budgets)


# ---- generation arguments ------------------------------------------------------------------


def test_responses_are_the_engines_turns_with_the_forcing_arguments_applied(tiny_model):
    model = T0S1LM(backend=EngineBackend(tiny_model), progress=False)
    budget = BudgetForcing(max_thinking_tokens=40, num_ignore=2, ignore_str="Wait", max_answer_tokens=12)
    expected = [_turn(tiny_model, r) for r in generate(tiny_model, PROMPTS, budget)]
    s1_names = {"max_tokens_thinking": 40, "thinking_n_ignore": 2, "thinking_n_ignore_str": "Wait", "max_gen_toks": 12}
    ours = {"max_thinking_tokens": 40, "num_ignore": 2, "ignore_str": "Wait", "max_answer_tokens": 12}
    assert _harness(model, PROMPTS, {"until": [], **s1_names}) == expected
    assert _harness(model, PROMPTS, {"until": [], **ours}) == expected
    # The same settings as model_args (defaults for every request) give the same texts.
    assert _harness(T0S1LM(backend=EngineBackend(tiny_model), progress=False, **s1_names), PROMPTS, {}) == expected
    assert _harness(T0S1LM(backend=EngineBackend(tiny_model), progress=False, **ours), PROMPTS, {}) == expected
    # The arguments take effect: without the ignores the turns differ, and "Wait" is in the thinking.
    assert _harness(model, PROMPTS, {**ours, "num_ignore": 0}) != expected
    assert any("Wait" in text.split(tiny_model.profile.thinking_end)[0] for text in expected)


@pytest.mark.parametrize(
    ("gen_kwargs", "message"),
    [
        ({"top_k": 5}, "unknown argument(s) for the t0s1 model: top_k"),
        ({"thinking_start": "<think>"}, "reasoning_format"),
        ({"max_tokens_thinking": 8, "max_thinking_tokens": 16}, "set the same thing (max_thinking_tokens)"),
        ({"thinking_n_ignore": -1}, "num_ignore must be a non-negative integer"),
        ({"do_sample": True, "temperature": 0}, "do_sample=True with temperature 0"),
        ({"until": 3}, "until must be a string or a list of strings"),
    ],
)
def test_bad_generation_arguments_are_errors(tiny_model, gen_kwargs, message):
    model = T0S1LM(backend=EngineBackend(tiny_model), progress=False)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _harness(model, PROMPTS[:1], gen_kwargs)


def test_chat_template_arguments_reach_the_backend(tiny_model_dir):
    model = T0S1LM(pretrained=str(tiny_model_dir), device="cpu", chat_template_kwargs='{"x": 1}', enable_thinking=False)
    assert model.backend.chat_template_kwargs == {"x": 1, "enable_thinking": False}
    with pytest.raises(UserError, match="disagree"):
        T0S1LM(pretrained=str(tiny_model_dir), device="cpu", chat_template_kwargs={"enable_thinking": True}, enable_thinking=False)


def test_unknown_model_argument_fails_before_loading_a_model():
    with pytest.raises(UserError, match=r"unknown argument\(s\) for the t0s1 model: rejection_sample \(rejection sampling is not supported\)"):
        T0S1LM(pretrained="no/such-model-is-loaded", rejection_sample=True)


def test_until_cuts_the_answer_on_the_engine_and_on_other_backends(tiny_model):
    budget = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=12)
    full = generate(tiny_model, PROMPTS, budget)
    # A stop string from the middle of each answer, and one that never occurs.
    stops = [r.answer[len(r.answer) // 2 :][:2] for r in full]
    assert all(stops) and len(set(stops)) == len(stops)
    until = [*stops, "no such text"]
    expected = [_turn(tiny_model, r, r.answer[: min(r.answer.find(s) for s in stops if s in r.answer)]) for r in full]
    gen_kwargs = {"until": until, "max_thinking_tokens": 24, "max_answer_tokens": 12}
    for backend in (EngineBackend(tiny_model), ClientBackend(tiny_model)):
        texts = _harness(T0S1LM(backend=backend, progress=False), PROMPTS, gen_kwargs)
        assert texts == expected
        assert all(len(text) < len(_turn(tiny_model, r)) for text, r in zip(texts, full, strict=True))


def test_chat_template_conversations_reach_the_engine_as_conversations(tiny_model):
    model = T0S1LM(backend=EngineBackend(tiny_model), max_thinking_tokens=16, max_answer_tokens=8, progress=False)
    conversation = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": PROMPTS[0]}]
    rendered = model.apply_chat_template(conversation)
    assert rendered == tiny_model.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    (text,) = model.generate_until([_request(rendered, {})])
    (result,) = generate(tiny_model, [conversation], BudgetForcing(max_thinking_tokens=16, max_answer_tokens=8))
    assert text == _turn(tiny_model, result)
    # A rendered conversation the model did not render itself (a request cache) is refused, not
    # wrapped in a second chat template; so is a prefilled answer (gen_prefix).
    foreign = tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": "Other?"}], tokenize=False, add_generation_prompt=True)
    with pytest.raises(UserError, match="--cache_requests"):
        model.generate_until([_request(foreign, {})])
    prefilled = model.apply_chat_template([*conversation, {"role": "assistant", "content": "Answer:"}], add_generation_prompt=False)
    with pytest.raises(UserError, match="gen_prefix"):
        model.generate_until([_request(prefilled, {})])


def test_greedy_repeats_are_generated_once_and_samples_are_seeded_as_t0s1_eval_seeds_them(tiny_model, shared_data_dir, tmp_path):
    backend = CountingBackend(tiny_model)
    model = T0S1LM(backend=backend, max_thinking_tokens=8, max_answer_tokens=4, progress=False)
    request = _request(PROMPTS[0], {}, repeats=3)
    texts = model.generate_until([request] * 3)
    assert len(set(texts)) == 1 and backend.prompts == [PROMPTS[0]]

    # Sampling with repeats: each (question, k) gets t0s1 eval --samples K's seed, so the texts equal its samples.
    examples = get_task("gsm8k").load(shared_data_dir, limit=2)
    config = EvalConfig(model="tiny", max_thinking_tokens=[12], num_ignore=[0], max_answer_tokens=6, samples=2, temperature=1.0, seed=7, batch_size=4)
    run_eval(EngineBackend(tiny_model), [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=2, progress=False)
    rows = {(r["id"], r["sample"]): r for r in map(json.loads, (tmp_path / "samples" / "gsm8k.jsonl").read_text().splitlines())}
    sampler = T0S1LM(backend=EngineBackend(tiny_model), max_thinking_tokens=12, max_answer_tokens=6, temperature=1.0, seed=7, batch_size=4, progress=False)
    requests = [_request(e.prompt, {}, doc_id=i, task="t0s1_gsm8k", repeats=2) for i, e in enumerate(examples)]
    texts = sampler.generate_until([r for r in requests for _ in range(2)])
    expected = [tiny_model.profile.assistant_content(rows[(e.id, k)]["thinking"], rows[(e.id, k)]["output"]) for e in examples for k in range(2)]
    assert texts == expected
    assert texts[0] != texts[1]  # two samples of one question differ


def test_loglikelihood_needs_the_transformers_backend(tiny_model):
    model = T0S1LM(backend=ClientBackend(tiny_model), progress=False)
    with pytest.raises(UserError, match="needs backend=transformers"):
        model.loglikelihood([Instance("loglikelihood", {}, ("Question: 1+1?\nAnswer:", " 2"), 0)])


# ---- tasks ---------------------------------------------------------------------------------


def test_every_t0s1_task_has_a_harness_config_that_reads_its_data(shared_data_dir):
    configs = {}
    for path in TASKS_DIR.glob("t0s1_*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        configs[config["dataset_kwargs"]["task"]] = config["task"]
    assert configs == {name: f"t0s1_{name}" for name in TASKS}
    docs = load_dataset("gsm8k", data_dir=str(shared_data_dir), pretrained="ignored", version=1.0)["test"]
    examples = get_task("gsm8k").load(shared_data_dir)
    assert [(d["id"], d["prompt"], d["gold"]) for d in docs] == [(e.id, e.prompt, e.gold) for e in examples]
    manager = task_manager(shared_data_dir, include_defaults=False)
    assert {f"t0s1_{name}" for name in TASKS} <= set(manager.all_tasks)


def test_the_tasks_decode_as_the_model_arguments_say(shared_data_dir, tiny_model):
    """The tasks' generation_kwargs, as the harness hands them to the model, leave the decoding to
    --model_args: temperature=0.6 there samples (a task temperature overrode it to greedy)."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(shared_data_dir, include_defaults=False)
    task = get_task_dict(["t0s1_gsm8k"], manager)["t0s1_gsm8k"]
    gen_kwargs = task.config.generation_kwargs
    model = T0S1LM(backend=EngineBackend(tiny_model), max_thinking_tokens=4, max_answer_tokens=2, temperature=0.6, seed=3,
                   progress=False)
    request = Instance("generate_until", {}, ("What is 1 + 1?", dict(gen_kwargs)), 0)
    request.task_name, request.doc_id = "t0s1_gsm8k", 0
    [job] = model._jobs([request])
    assert job.budget.temperature == 0.6 and not job.budget.greedy


# ---- the acceptance run on SmolLM2 -----------------------------------------------------------


@pytest.mark.slow
def test_harness_on_smollm2_equals_t0s1_eval_and_t0s1_grade(smollm2, shared_data_dir, tmp_path):
    from t0s1.cli import app

    # Four GSM8K questions, two of which SmolLM2 answers right with these settings.
    lines = (shared_data_dir / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "gsm8k_test.jsonl").write_text("".join(lines[i] + "\n" for i in (0, 20, 1, 31)), encoding="utf-8")
    settings = {"max_thinking_tokens": 32, "num_ignore": 1, "max_answer_tokens": 32}
    backend = EngineBackend(smollm2)
    config = EvalConfig(model="smollm2", max_thinking_tokens=[32], num_ignore=[1], max_answer_tokens=32, batch_size=4)
    run_eval(backend, [get_task("gsm8k")], config, tmp_path / "eval", data_dir=data_dir, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert 0 < sum(r["correct"] for r in rows) < len(rows)  # right and wrong answers to compare

    model = T0S1LM(backend=backend, batch_size=4, progress=False, **settings)
    manager = task_manager(data_dir, include_defaults=False)
    for chat in (False, True):
        results = lm_eval.simple_evaluate(model=model, tasks=["t0s1_gsm8k"], task_manager=manager, apply_chat_template=chat)
        samples = results["samples"]["t0s1_gsm8k"]
        assert [smollm2.profile.split(s["resps"][0][0]) for s in samples] == [(r["thinking"], r["output"]) for r in rows]
        assert [s["doc"]["id"] for s in samples] == [r["id"] for r in rows]

    # t0s1 grade on the harness's responses gives its exact match, sample by sample.
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": s["doc"]["id"], "output": s["resps"][0][0]}) + "\n" for s in samples))
    verdicts_path = tmp_path / "verdicts.jsonl"
    graded = CliRunner().invoke(app, ["grade", "--task", "gsm8k", "--predictions", str(predictions), "--data-dir", str(data_dir), "--out", str(verdicts_path)])
    assert graded.exit_code == 0, graded.output
    verdicts = [json.loads(line) for line in verdicts_path.read_text().splitlines()]
    assert [v["correct"] for v in verdicts] == [bool(s["exact_match"]) for s in samples] == [r["correct"] for r in rows]
    assert results["results"]["t0s1_gsm8k"]["exact_match,none"] == sum(r["correct"] for r in rows) / len(rows)


@pytest.mark.slow
def test_multiple_choice_task_scores_continuations_with_the_model(smollm2, tmp_path):
    questions = [
        {"question": "What is 2 + 3?", "choices": ["5", "7", "9"], "label": 0},
        {"question": "Which animal barks?", "choices": ["a cat", "a dog", "a fish"], "label": 1},
        {"question": "What color is the sky on a clear day?", "choices": ["green", "red", "blue"], "label": 2},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    task = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    }
    model = T0S1LM(backend=EngineBackend(smollm2), batch_size=4, progress=False)
    results = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=task_manager(include_defaults=False))
    samples = results["samples"]["tiny_mc"]
    tokenizer, net = smollm2.tokenizer, smollm2.model
    correct = 0
    for sample, question in zip(samples, questions, strict=True):
        scores = []
        for choice, (logprob, _greedy) in zip(question["choices"], (r[0] for r in sample["resps"]), strict=True):
            context = tokenizer(f"Question: {question['question']}\nAnswer:", add_special_tokens=False).input_ids
            whole = tokenizer(f"Question: {question['question']}\nAnswer: {choice}", add_special_tokens=False).input_ids
            with torch.inference_mode():
                logits = net(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            expected = sum(logits[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
            assert logprob == pytest.approx(expected, abs=1e-3)
            scores.append(expected)
        correct += scores.index(max(scores)) == question["label"]
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(questions))


# ---- the command ---------------------------------------------------------------------------


def test_t0s1_is_registered_beside_the_harness_models():
    from lm_eval.api.registry import get_model
    from lm_eval.models.dummy import DummyLM

    assert get_model("t0s1") is T0S1LM
    assert get_model("dummy") is DummyLM  # registering ours does not hide the harness's own


def test_command_runs_the_harness_with_the_t0s1_model_and_tasks(tiny_model_dir, shared_data_dir, tmp_path):
    from t0s1.cli import app

    out = tmp_path / "out"
    args = ["lm-eval", "--model_args", f"pretrained={tiny_model_dir},max_tokens_thinking=8,max_gen_toks=6,device=cpu",
            "--tasks", "t0s1_gsm8k", "--limit", "2", "--data-dir", str(shared_data_dir), "--output_path", str(out), "--log_samples"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["t0s1_gsm8k"]
    assert results["config"]["budget_forcing"]["max_thinking_tokens"] == 8
    (samples_file,) = out.rglob("samples_t0s1_gsm8k_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2 and all(s["resps"][0][0].startswith("<|im_start|>think\n") for s in samples)
    # With a policy (its model args were refused by the command's own check before the harness ran)
    voted = tmp_path / "voted"
    args = ["lm-eval", "--model_args", f"pretrained={tiny_model_dir},max_tokens_thinking=8,max_gen_toks=6,device=cpu,policy=vote,n=2,"
            "temperature=0.8,seed=1", "--tasks", "t0s1_gsm8k", "--limit", "1", "--data-dir", str(shared_data_dir), "--output_path", str(voted)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(voted.rglob("results_*.json"))


def test_command_rejects_unknown_arguments_before_loading(tiny_model_dir):
    from t0s1.cli import app

    result = CliRunner().invoke(app, ["lm-eval", "--model_args", f"pretrained={tiny_model_dir},thinking_end=x", "--tasks", "t0s1_gsm8k"])
    assert result.exit_code == 2
    assert "thinking_end" in result.output and "reasoning_format" in result.output
    result = CliRunner().invoke(app, ["lm-eval", "--model_args", f"pretrained={tiny_model_dir},policy=deepconf,policy_window=0",
                                      "--tasks", "t0s1_gsm8k"])
    assert result.exit_code == 2 and "window" in result.output
