"""Budget forcing inside `vllm serve`: a real server process with t0s1's plugin, queried with the
`openai` client.

Two servers on the embedded SmolLM2 (float32 safetensors), started once for the module: the model
as it is (ChatML: the s1 profile) and the same weights with a chat template that writes `<think>`
(the `<think>` profile, detected from the template). Greedy replies equal t0s1's transformers
engine on the same prompts x budgets x num_ignore; requests without budget fields are plain vLLM;
budget fields vLLM would otherwise ignore are refused with a 400. The reasoning parser's split on
the other profiles (prefilled, hybrid with `enable_thinking`) runs on the tiny family models.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from t0s1 import BudgetForcing, generate
from t0s1.models import embedded_model_dir, load_model

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from model_families import _build_tokenizer, family_chat_template, family_facts  # noqa: E402

PROMPTS = ["What is 12 + 35 * 2?", "How many r are in the word raspberry?", "Name a prime number greater than 20."]
# A forced end at once, Waits then a forced end, Waits then the model's own end (checked below).
GRID = [(0, 0), (12, 2), (40, 2)]
ANSWER_TOKENS = 16
START_TIMEOUT = 600  # seconds for a server to start (about 90 s on two busy cores)

THINK_TEMPLATE = (
    "{# This model thinks in <think> ... </think> #}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``vllm serve MODEL --reasoning-parser t0s1`` in a subprocess."""

    def __init__(self, model: Path, log: Path, *extra: str, env: dict | None = None):
        self.model, self.port, self.log = str(model), _free_port(), log
        # `vllm serve` itself: vLLM's CPU build installs its `vllm` command without the distribution
        # name it looks itself up by, so the server module is started directly. Eager mode: no
        # compilation at start-up (minutes on a small CPU).
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32",
            "--reasoning-parser", "t0s1", "--seed", "0", "--enforce-eager", *extra,
        ]
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=300)

    def wait(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                self.client.models.list()
                return self
            except openai.APIConnectionError:
                time.sleep(1)
        raise RuntimeError(f"vllm serve did not start in {START_TIMEOUT} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def chat(self, prompt: str, *, stream: bool = False, **fields):
        """One greedy chat request; ``fields``: vllm_xargs, plus thinking_token_budget at the top."""
        body = {}
        if "thinking_token_budget" in fields:
            body["thinking_token_budget"] = fields.pop("thinking_token_budget")
        if fields:
            body["vllm_xargs"] = fields
        request = dict(model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
                       max_tokens=400, extra_body=body)
        if not stream:
            message = self.client.chat.completions.create(**request).choices[0].message
            return _reasoning(message), message.content
        reasoning, content = [], []
        for chunk in self.client.chat.completions.create(**request, stream=True):
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning.append(_reasoning(delta) or "")
                content.append(delta.content or "")
        return "".join(reasoning) or None, "".join(content) or None


def _reasoning(message) -> str | None:
    return getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None)


def think_model_dir(path: Path) -> Path:
    """The embedded SmolLM2's weights under a chat template that writes <think> (links, no copies)."""
    source = embedded_model_dir()
    path.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "chat_template.jinja":
            (path / item.name).symlink_to(item)
    (path / "chat_template.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")
    return path


SETTINGS = [BudgetForcing(max_thinking_tokens=b, num_ignore=n, max_answer_tokens=ANSWER_TOKENS) for b, n in GRID]
PLAIN_TOKENS = 24


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {"s1": embedded_model_dir(), "think": think_model_dir(tmp_path_factory.mktemp("think-model"))}


@pytest.fixture(scope="module")
def expected(model_dirs):
    """t0s1's transformers engine on each model directory (the profile detected alike), run before
    the servers start: vLLM's CPU workers keep the cores busy while they are up."""
    import torch

    results = {}
    for name, path in model_dirs.items():
        lm = load_model(str(path), device="cpu", dtype="float32", backend="transformers")
        assert lm.profile.name == name
        prompts = [prompt for _ in SETTINGS for prompt in PROMPTS]
        results[name] = generate(lm, prompts, [setting for setting in SETTINGS for _ in PROMPTS])
        if name == "s1":  # the model's own greedy continuation, for the plain request
            prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                                      return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = lm.model.generate(**prompt, max_new_tokens=PLAIN_TOKENS, do_sample=False)
            new = out[0, prompt["input_ids"].shape[1]:]
            results["plain"] = (lm.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new))
    return results


@pytest.fixture(scope="module")
def servers(model_dirs, expected, tmp_path_factory):
    """Both servers, started together (their loads overlap), after the engine's references."""
    logs = tmp_path_factory.mktemp("vllm-serve-logs")
    started = {name: Server(path, logs / f"{name}.log") for name, path in model_dirs.items()}
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.parametrize("profile", ["s1", "think"])
def test_greedy_budget_forcing_equals_the_transformers_engine(servers, expected, profile):
    server, want = servers[profile], expected[profile]
    requests = [
        # vLLM's own name of the budget for one setting, t0s1's for the others
        (prompt, {"thinking_token_budget" if i == 1 else "max_thinking_tokens": s.max_thinking_tokens,
                  "num_ignore": s.num_ignore, "max_answer_tokens": ANSWER_TOKENS})
        for i, s in enumerate(SETTINGS) for prompt in PROMPTS
    ]
    with ThreadPoolExecutor(len(requests)) as pool:  # concurrent: one batch, rows joining and leaving
        replies = list(pool.map(lambda request: server.chat(request[0], **request[1]), requests))
    for (prompt, fields), result, reply in zip(requests, want, replies, strict=True):
        assert reply == (result.thinking or None, result.answer or None), (profile, prompt, fields)
    # The grid exercised what it is for: forced ends, Waits and ends of thinking the model chose.
    assert any(r.hit_budget for r in want) and any(r.num_ignored for r in want)
    assert any(not r.hit_budget and r.thinking_tokens for r in want)


@pytest.mark.parametrize("profile", ["s1", "think"])
def test_streamed_reasoning_and_content_add_up_to_the_whole_reply(servers, profile):
    server = servers[profile]
    for fields in ({"max_thinking_tokens": 12, "num_ignore": 1, "max_answer_tokens": ANSWER_TOKENS},
                   {"thinking_token_budget": 16, "max_answer_tokens": ANSWER_TOKENS}):
        whole = server.chat(PROMPTS[0], **fields)
        reasoning, content = server.chat(PROMPTS[0], stream=True, **fields)
        assert whole[0] and whole[1]
        assert (reasoning.strip(), content.strip()) == whole, fields


def test_the_s1_forced_end_writes_the_answer_delimiter_and_final_answer(servers):
    """PROMPTS[0] thinks past 8 tokens (the others end their thinking by themselves at 2)."""
    server = servers["s1"]
    reply = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0.0, max_tokens=60,
        extra_body={"vllm_xargs": {"max_thinking_tokens": 8}, "skip_special_tokens": False},
    )
    message = reply.choices[0].message
    assert _reasoning(message) and (message.content or "").startswith("Final Answer:"), reply.model_dump()


def test_requests_without_budget_fields_are_plain_vllm(servers, expected):
    """No field: the plugin leaves the request alone; greedy vLLM continues the prompt as the model
    does (transformers' generate), with no thinking start written for it."""
    server = servers["s1"]
    reply = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0.0, max_tokens=PLAIN_TOKENS)
    text, count = expected["plain"]
    assert (reply.choices[0].message.content, reply.usage.completion_tokens) == (text, count)
    assert not _reasoning(reply.choices[0].message)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"vllm_xargs": {"thinking_budget": 10}}, "thinking_budget"),  # SGLang's name, misplaced
        ({"vllm_xargs": {"max_tokens_thinking": 10}}, "max_tokens_thinking"),  # s1's lm-eval name
        ({"thinking_token_budget": 10, "vllm_xargs": {"max_thinking_tokens": 20}}, "disagree"),
        ({"vllm_xargs": {"num_ignore": -1}}, "num_ignore"),
        ({"vllm_xargs": {"max_thinking_tokens": "lots"}}, "max_thinking_tokens"),
        ({"vllm_xargs": {"max_thinking_tokens": 8}, "repetition_penalty": 1.2}, "repetition_penalty"),  # acts after the choice
        ({"vllm_xargs": {"max_thinking_tokens": 8}, "min_p": 0.1}, "min_p"),
    ],
)
def test_budget_fields_that_cannot_be_honoured_are_refused(servers, body, named):
    server = servers["s1"]
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, extra_body=body)
    assert named in str(refused.value)


def test_a_model_whose_reasoning_format_cannot_be_told_fails_at_start_up(tmp_path):
    """A harmony-style template (gpt-oss's channels, which t0s1 cannot force): the server stops
    before loading weights, naming the model."""
    model = think_model_dir(tmp_path / "harmony")
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.jinja").write_text(THINK_TEMPLATE.replace("<think>", "<|channel|>analysis"), encoding="utf-8")
    server = Server(model, tmp_path / "harmony.log")
    try:
        server.process.wait(START_TIMEOUT)
    finally:
        server.stop()
    log = (tmp_path / "harmony.log").read_text()
    assert server.process.returncode != 0
    assert str(model) in log and "T0S1_REASONING_FORMAT" in log


# --------------------------------------------------------------------------------------------
# The reasoning parser on every profile (vLLM's own parser machinery, no server)


def _parser(model_dir: Path, **template_kwargs):
    from transformers import AutoTokenizer
    from vllm.parser.parser_manager import ParserManager

    import t0s1.vllm_plugin

    t0s1.vllm_plugin.register()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parser_class = ParserManager.get_parser(tool_parser_name=None, reasoning_parser_name="t0s1", enable_auto_tools=False,
                                            model_name=str(model_dir), tokenizer=tokenizer)
    return tokenizer, lambda: parser_class(tokenizer, None, chat_template_kwargs=template_kwargs, model_config=None)


CASES = [  # family, chat template kwargs, reply, (reasoning, content)
    ("smollm2", {}, "<|im_start|>think\nLet me add.\nWait, 2.<|im_start|>answer\nFinal Answer: 4", ("Let me add.\nWait, 2.", "Final Answer: 4")),
    ("smollm2", {}, "The answer is 4.", (None, "The answer is 4.")),
    ("qwen3", {}, "<think>\nHmm, 2 + 2.\n</think>\n\nIt is 4.", ("Hmm, 2 + 2.", "It is 4.")),
    ("qwen3", {"enable_thinking": False}, "It is 4.", (None, "It is 4.")),
    ("qwen3-thinking-2507", {}, "Hmm, 2 + 2.\n</think>\n\nIt is 4.", ("Hmm, 2 + 2.", "It is 4.")),
    ("qwen3-thinking-2507", {}, "Still thinking", ("Still thinking", None)),
    ("deepseek-r1-distill-qwen", {}, "Four.\n</think>\n\n**4**", ("Four.", "**4**")),
]


def family_tokenizer_dir(family: str, path: Path) -> Path:
    """The family's tokenizer (real chat template and special tokens) alone: the parser needs no weights."""
    facts = family_facts(family)
    _build_tokenizer(facts, set(), family_chat_template(family)).save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = facts["tokenizer"]["tokenizer_class"]
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: family_tokenizer_dir(family, root / family) for family in {case[0] for case in CASES}}


@pytest.mark.parametrize(("family", "template_kwargs", "reply", "expected"), CASES)
def test_the_reasoning_parser_splits_every_profile_whole_and_streamed(family_dirs, family, template_kwargs, reply, expected):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    tokenizer, new_parser = _parser(family_dirs[family], **template_kwargs)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "2+2?"}], chat_template_kwargs=template_kwargs)
    reasoning, content, _ = new_parser().parse(reply, request)
    assert (reasoning or None, content or None) == expected

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False,
                                           **template_kwargs)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(reply, add_special_tokens=False).input_ids
    parser, streamed, text = new_parser(), {"reasoning": "", "content": ""}, ""
    for index, token in enumerate(ids):  # one token per delta, its text as vLLM's detokenizer gives it
        grown = tokenizer.decode(ids[: index + 1], skip_special_tokens=False)
        delta_text, text = grown[len(text):], grown
        delta = parser.parse_delta(delta_text, [token], request, prompt_token_ids=prompt_ids, finished=index == len(ids) - 1)
        if delta is not None:
            streamed["reasoning"] += delta.reasoning or ""
            streamed["content"] += delta.content or ""
    assert (streamed["reasoning"].strip() or None, streamed["content"].strip() or None) == expected
