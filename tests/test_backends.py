"""Backends: client-driven budget forcing (vLLM, OpenAI) against the engine, and the guards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from t0s1 import BudgetForcing, generate
from t0s1.backends import make_backend
from t0s1.backends.openai_compat import OpenAIBackend
from t0s1.backends.vllm import VLLMBackend
from t0s1.errors import UserError

PROMPTS = ["What is 12 + 35 * 2?", "How many r are in raspberry?", "Count 0 1 2 3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeLLM:
    """``vllm.LLM`` as the backend uses it, greedy over a transformers model (no cache, tiny)."""

    def __init__(self, lm):
        self.lm = lm
        self.requests = []

    def get_tokenizer(self):
        return self.lm.tokenizer

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            self.requests.append((list(prompt["prompt_token_ids"]), p))
            ids = list(prompt["prompt_token_ids"])
            generated, finish, stop_reason = [], "length", None
            stops = set(p.stop_token_ids) | {self.lm.tokenizer.eos_token_id}
            while len(generated) < p.max_tokens:
                logits = self.lm.model(torch.tensor([ids + generated])).logits[0, -1]
                banned = torch.ones_like(logits, dtype=torch.bool)
                banned[p.allowed_token_ids] = False
                if len(generated) < p.min_tokens:
                    banned[list(stops)] = True
                token = int(torch.argmax(logits.masked_fill(banned, float("-inf"))))
                generated.append(token)  # vLLM keeps the stop token id in token_ids
                if token in stops:
                    finish, stop_reason = "stop", (token if token in p.stop_token_ids else None)
                    break
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=generated, finish_reason=finish, stop_reason=stop_reason)]))
        return outputs


@pytest.mark.parametrize(
    "settings",
    [
        BudgetForcing(max_thinking_tokens=12, max_answer_tokens=5),
        BudgetForcing(max_thinking_tokens=40, num_ignore=2, max_answer_tokens=5),
        BudgetForcing(max_thinking_tokens=0, max_answer_tokens=4),
    ],
    ids=["cap", "wait", "zero"],
)
def test_vllm_backend_equals_the_engine(tiny_model, settings):
    """The re-submitting driver follows the same rules as the engine, token for token."""
    fake = FakeLLM(tiny_model)
    backend = VLLMBackend(fake, model_name="tiny", sampling_params_class=SimpleNamespace)
    got = backend.generate(PROMPTS, settings)
    for prompt, result in zip(PROMPTS, got, strict=True):
        expected = generate(tiny_model, [prompt], settings)[0]
        assert result.thinking_token_ids == expected.thinking_token_ids
        assert result.answer_token_ids == expected.answer_token_ids
        for field in ("thinking", "answer", "thinking_tokens", "answer_tokens", "num_ignored", "hit_budget", "finish_reason", "prompt_tokens"):
            assert getattr(result, field) == getattr(expected, field), field
    params = [p for _, p in fake.requests]
    assert all(p.allowed_token_ids == list(range(tiny_model.vocab_size)) for p in params)
    assert all(p.skip_special_tokens is False for p in params)


def test_vllm_backend_injects_wait_and_bans_the_immediate_stop(tiny_model):
    """Force a stop on the tiny model by making every thinking request stop at once."""
    fake = FakeLLM(tiny_model)
    wait_ids = tiny_model.tokenizer("Wait", add_special_tokens=False).input_ids
    stop_first = {"n": 0}
    original = fake.generate

    def generate_stopping(prompts, params, use_tqdm=True):
        outs = original(prompts, params, use_tqdm)
        for out, p in zip(outs, params, strict=True):
            if p.max_tokens > 5 and p.min_tokens == 0 and stop_first["n"] < 2:  # a thinking request
                stop_first["n"] += 1
                out.outputs[0].token_ids = [7, p.stop_token_ids[0]]
                out.outputs[0].finish_reason, out.outputs[0].stop_reason = "stop", p.stop_token_ids[0]
        return outs

    fake.generate = generate_stopping
    backend = VLLMBackend(fake, sampling_params_class=SimpleNamespace)
    result = backend.generate(PROMPTS[:1], BudgetForcing(max_thinking_tokens=30, num_ignore=1, max_answer_tokens=3))[0]
    assert result.num_ignored == 1
    assert result.thinking_token_ids[:1 + len(wait_ids)] == [7, *wait_ids]
    thinking_requests = [p for _, p in fake.requests if p.max_tokens != 3]
    assert [p.min_tokens for p in thinking_requests[:2]] == [0, 1]  # no stop right after "Wait"
    assert thinking_requests[1].max_tokens == 30 - 1 - len(wait_ids)  # the rest of the budget


class ScriptedClient:
    """``openai.OpenAI().completions`` returning scripted texts, recording each request."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []
        self.completions = self

    def create(self, **request):
        self.requests.append(request)
        text, finish = self.replies.pop(0)
        return SimpleNamespace(choices=[SimpleNamespace(text=text, finish_reason=finish)])


def test_openai_backend_drives_budget_forcing_from_the_client(tiny_model):
    tokenizer = tiny_model.tokenizer
    client = ScriptedClient([("Let me count", "stop"), (" one by one", "stop"), ("Final answer 82", "stop")])
    backend = OpenAIBackend(client, "served-model", tokenizer, concurrency=1)
    result = backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=200, num_ignore=1, max_answer_tokens=9))[0]
    first, second, third = client.requests
    assert first["prompt"].endswith("<|im_start|>assistant\n<|im_start|>think")
    assert first["max_tokens"] == 200 and "<|im_start|>" in first["stop"] and "<|im_end|>" in first["stop"]
    assert second["prompt"] == first["prompt"] + "Let me countWait"  # the ignore string, appended by the client
    assert third["prompt"] == second["prompt"] + " one by one<|im_start|>answer"  # natural end: the delimiter
    assert third["max_tokens"] == 9 and "<|im_start|>" not in third["stop"]
    assert result.thinking == "Let me countWait one by one" and result.num_ignored == 1 and not result.hit_budget
    assert result.answer == "Final answer 82" and result.finish_reason == "stop"
    assert all(r["model"] == "served-model" for r in client.requests)


def test_openai_backend_forces_the_answer_at_the_budget(tiny_model):
    tokenizer = tiny_model.tokenizer
    thinking = tokenizer.decode(tokenizer("Let me count the letters one by one", add_special_tokens=False).input_ids[:6])
    client = ScriptedClient([(thinking, "length"), (" 82", "stop")])
    backend = OpenAIBackend(client, "m", tokenizer)
    result = backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=6, max_answer_tokens=9))[0]
    assert result.hit_budget and result.thinking_tokens == 6
    assert client.requests[1]["prompt"].endswith(thinking + "\n<|im_start|>answer\nFinal Answer:")
    assert result.answer == "Final Answer: 82"


def test_vllm_is_optional():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install"):
            make_backend("vllm", "some/model")
    else:  # pragma: no cover - only where vLLM is installed (a GPU machine)
        pytest.skip("vLLM is installed; the real backend is exercised by test_backends_vllm_gpu")


def test_unknown_backend_and_missing_base_url():
    with pytest.raises(UserError, match="Unknown backend"):
        make_backend("llama", "m")
    with pytest.raises(UserError, match="runs a .gguf model file"):
        make_backend("llamacpp", "m")
    with pytest.raises(UserError, match="--base-url"):
        make_backend("openai", "m")


def test_real_vllm_matches_the_engine_on_a_gpu():
    """On a machine with vLLM and a GPU: the real vLLM backend gives the engine's greedy thinking."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():  # pragma: no cover
        pytest.skip("vLLM needs a GPU")
    from t0s1 import load_model
    from t0s1.models import embedded_model_dir

    model_dir = str(embedded_model_dir())
    backend = make_backend("vllm", model_dir)
    settings = BudgetForcing(max_thinking_tokens=32, num_ignore=1, max_answer_tokens=16)
    got = backend.generate(PROMPTS, settings)
    expected = generate(load_model(model_dir, device="cuda", dtype="float32"), PROMPTS, settings)
    assert [r.thinking_tokens <= 32 for r in got] == [True] * len(PROMPTS)
    assert sum(a.thinking_token_ids[:8] == b.thinking_token_ids[:8] for a, b in zip(got, expected, strict=True)) >= 2
