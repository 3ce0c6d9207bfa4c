"""The ``t0s1`` model of lm-evaluation-harness: budget forcing through t0s1's own backends.

``generate_until`` hands the requests to the same ``Backend`` that ``t0s1 eval`` uses, in the
same batches (the requests' order, ``batch_size`` at a time, never across tasks), so for the same
questions and settings the harness gets the texts ``t0s1 eval`` logs. A response is the whole
assistant turn, thinking included (``ModelProfile.assistant_content``), so the logged samples
keep the thinking and graders read the answer after the answer delimiter.

Prompts: a context the harness rendered with ``--apply_chat_template`` (through
``apply_chat_template`` below) goes to the engine as the conversation it came from; any other
context is the user message. Either way the engine renders the chat template and opens the
thinking, exactly as for ``t0s1 eval``.

``loglikelihood`` and ``loglikelihood_rolling`` (multiple-choice and perplexity tasks) score with
the transformers model through the harness's own ``HFLM``, without thinking.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

try:
    # lm_eval.models registers the harness's own models; the registry only does that itself
    # while it is empty, so it must come before ours.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # the optional extra is not installed
    raise ImportError("The t0s1 harness model needs lm-evaluation-harness: pip install 't0s1[lm-eval]'.") from error

from t0s1.backends import Backend, make_backend
from t0s1.backends.engine import EngineBackend
from t0s1.cli_support import parse_chat_template_kwargs
from t0s1.errors import UserError
from t0s1.evaluation.runner import sample_seed
from t0s1.forcing import BudgetForcing, Prompt, Result, generate
from t0s1.lm_eval import arguments
from t0s1.models import EMBEDDED_MODEL
from t0s1.progress import ProgressBar

DEFAULT_BATCH_SIZE = 8
"""Requests generated together: ``t0s1 eval --batch-size``'s default."""

MODEL_ARGS = (
    "pretrained", "backend", "base_url", "api_key", "tokenizer", "device", "dtype",
    "reasoning_format", "trust_remote_code", "chat_template_kwargs", "enable_thinking", "batch_size",
    "max_batch_size", "progress",
)  # fmt: skip
"""The model_args that choose the model and backend (the rest are generation settings)."""


def check_model_args(model_args: dict) -> BudgetForcing:
    """The default generation settings named in model_args; a UserError on an unknown name."""
    accepted = (*MODEL_ARGS, *arguments.names(requests=False))
    unknown = [key for key in model_args if key not in accepted]
    if unknown:
        reasons = [f"{key} ({arguments.S1_ONLY[key]})" if key in arguments.S1_ONLY else key for key in unknown]
        raise UserError(f"--model_args: unknown argument(s) for the t0s1 model: {'; '.join(reasons)}. Accepted: {', '.join(accepted)}.")
    forcing = {key: value for key, value in model_args.items() if key not in MODEL_ARGS}
    return arguments.budget_from_arguments(forcing, BudgetForcing(), requests=False)


@register_model("t0s1")
class T0S1LM(LM):
    """Budget forcing in the harness.

    pretrained: anything ``t0s1.load_model`` takes (the embedded default, a directory, a .gguf
        file, a hub id), or the served model name with ``backend=openai``.
    backend: ``transformers`` (default), ``vllm`` or ``openai``, or a ``Backend`` instance.
    chat_template_kwargs (a dict or JSON object), enable_thinking: passed to the chat template, as
        ``t0s1 eval --chat-template-kwargs`` / ``--thinking/--no-thinking`` pass them.
    batch_size: requests generated together (``auto``: 8 on transformers, every request of a task
        at once on vllm and openai, which schedule them themselves; ``max_batch_size`` if given).
    Generation defaults (s1's names or ours): ``max_thinking_tokens`` / ``max_tokens_thinking``,
    ``num_ignore`` / ``thinking_n_ignore``, ``ignore_str`` / ``thinking_n_ignore_str``,
    ``max_answer_tokens`` / ``max_gen_toks``, ``temperature``, ``top_p``, ``seed``; each request's
    gen_kwargs override them.
    policy, n, policy_KEY: a test-time policy over budget forcing (``t0s1.policies``, e.g.
        ``policy=deepconf,n=8,policy_window=64,temperature=0.6``): the reply is that of the trace
        carrying the vote, and the vote reads each trace's reply cut at the request's stop strings
        with ``harness_answer``. Engine backends (transformers, llama.cpp) only.
    """

    def __init__(
        self,
        pretrained: str = EMBEDDED_MODEL,
        backend: str | Backend = "transformers",
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        reasoning_format: str | None = None,
        trust_remote_code: bool = False,
        chat_template_kwargs: dict | str | None = None,
        enable_thinking: bool | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        progress: bool = True,
        **generation,
    ) -> None:
        super().__init__()
        self.policy = policy_from_model_args(generation)
        self.defaults = check_model_args(generation)
        if isinstance(chat_template_kwargs, dict):
            chat_template_kwargs = json.dumps(chat_template_kwargs)
        template_kwargs = parse_chat_template_kwargs(chat_template_kwargs, enable_thinking)
        if isinstance(backend, Backend):
            if template_kwargs:
                raise UserError("Give chat_template_kwargs / enable_thinking to the Backend itself (make_backend) when passing one.")
            self.backend = backend
        else:
            self.backend = make_backend(
                str(backend), str(pretrained), device=device or "auto", dtype=dtype, base_url=base_url, api_key=api_key,
                tokenizer=tokenizer, reasoning_format=reasoning_format, trust_remote_code=bool(trust_remote_code),
                chat_template_kwargs=template_kwargs,
            )  # fmt: skip
        self.batch_size = _batch_size(batch_size, max_batch_size, self.backend)
        self.progress = bool(progress)
        self.tokenizer, self.profile = _tokenizer_and_profile(self.backend)
        if self.policy is not None and not isinstance(self.backend, EngineBackend):
            raise UserError(f"policy={self.policy.name} runs on the engine backends (transformers, llamacpp), not {self.backend.name}.")
        self._conversations: dict[str, list[dict]] = {}  # rendered chat template -> its messages
        self._scorer = None

    # ---- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = self._jobs(requests)
        first: dict[tuple, _Job] = {}  # requests that give the same text (greedy repeats) run once
        for job in jobs:
            first.setdefault(job.key, job)
        with ProgressBar(self.progress and not disable_tqdm, len(first), "t0s1 generating", unit="requests") as bar:
            for batch in _batches(list(first.values()), self.batch_size):
                results = self._generate([job.prompt for job in batch], [job.budget for job in batch], [job.until for job in batch])
                for job, (result, answer) in zip(batch, results, strict=True):
                    job.text = self.profile.assistant_content(result.thinking, answer, with_start=not self.profile.prefilled)
                bar.advance(len(batch))
        texts = [first[job.key].text for job in jobs]
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _jobs(self, requests) -> list[_Job]:
        """Prompt, settings and stop strings per request. Sampled repeats of a request
        (``repeats: K``) are seeded from (question, k), as ``t0s1 eval --samples K`` seeds them."""
        jobs, occurrences = [], Counter()
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = arguments.stop_strings(gen_kwargs)
            gen_kwargs.pop("until", None)
            budget = arguments.budget_from_arguments(gen_kwargs, self.defaults, requests=True)
            k = occurrences[id(request)]
            occurrences[id(request)] += 1
            if not budget.greedy:
                question = request.doc_id if request.doc_id is not None else index
                budget = replace(budget, seed=None if budget.seed is None else sample_seed(budget.seed, question, k))
            unrepeatable = index if budget.seed is None and not budget.greedy else None
            jobs.append(_Job(request.task_name, self._prompt(context), budget, until, unrepeatable))
        return jobs

    def _prompt(self, context: str):
        conversation = self._conversations.get(context)
        if conversation is not None:
            if conversation[-1].get("role") == "assistant":
                raise UserError(
                    "The task prefills the assistant's answer (gen_prefix); budget forcing starts the assistant turn with "
                    "the thinking, so it cannot continue a prefilled answer. Use a task without gen_prefix."
                )
            return conversation
        if self._generation_prompt and context.endswith(self._generation_prompt):
            raise UserError(
                "This prompt was rendered with the chat template outside this run (a request cache?); the t0s1 model "
                "needs the conversation itself. Run without --cache_requests, or without --apply_chat_template."
            )
        return context

    def _generate(self, prompts: list, budgets: list[BudgetForcing], untils: list[list[str]]) -> list[tuple[Result, str]]:
        """Results and their answers cut at the first ``until`` string. On the engine, a row
        stops as soon as its answer holds one (``is_cancelled``); other backends finish it."""
        if self.policy is not None:
            return self._generate_with_policy(prompts, budgets, untils)
        if isinstance(self.backend, EngineBackend) and any(untils):
            answers = [""] * len(prompts)
            stopped = [False] * len(prompts)

            def on_delta(i: int, channel: str, text: str) -> None:
                if channel == "answer" and untils[i]:
                    answers[i] += text
                    stopped[i] = any(stop in answers[i] for stop in untils[i])

            results = generate(
                self.backend.lm, prompts, budgets, chat_template_kwargs=self.backend.chat_template_kwargs,
                on_delta=on_delta, is_cancelled=stopped.__getitem__,
            )  # fmt: skip
        else:
            results = self.backend.generate(prompts, budgets)
        return [(result, cut_at_stop(result.answer, until)) for result, until in zip(results, untils, strict=True)]

    def _generate_with_policy(self, prompts: list, budgets: list[BudgetForcing], untils: list[list[str]]) -> list[tuple[Result, str]]:
        """Each request's reply under the policy (requests that share settings run together)."""
        from t0s1.policies.run import generate_with_policy

        out: list = [None] * len(prompts)
        groups = [(budget, tuple(until)) for budget, until in zip(budgets, untils, strict=True)]
        for budget, until in dict.fromkeys(groups):
            chosen = [i for i, group in enumerate(groups) if group == (budget, until)]
            results = generate_with_policy(self.backend.lm, [prompts[i] for i in chosen], budget, self.policy,
                                           chat_template_kwargs=self.backend.chat_template_kwargs,
                                           extract=lambda text, until=until: harness_answer(cut_at_stop(text, until)))
            for i, result in zip(chosen, results, strict=True):
                out[i] = (result.result, cut_at_stop(result.answer, untils[i]))
        return out

    # ---- chat template ----------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the model's chat template (remembered, so that the
        engine gets the conversation itself)."""
        rendered = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt, **(self.backend.chat_template_kwargs or {}),
        )  # fmt: skip
        self._conversations[rendered] = [dict(message) for message in chat_history]
        return rendered

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if isinstance(chat_template, str):
            raise UserError(
                f"--apply_chat_template {chat_template}: the t0s1 model always uses the tokenizer's own chat template "
                "(the engine renders prompts with it); pass --apply_chat_template without a name."
            )
        return self.tokenizer.chat_template

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.backend.model_name).replace("/", "__")

    @functools.cached_property
    def _generation_prompt(self) -> str:
        """What the chat template appends for the assistant's turn (``<|im_start|>assistant\\n``)."""
        probe, kwargs = [{"role": "user", "content": "?"}], self.backend.chat_template_kwargs or {}
        with_prompt = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kwargs)
        without = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False, **kwargs)
        return with_prompt[len(without) :] if with_prompt.startswith(without) else ""

    def get_model_info(self) -> dict:
        """Recorded in the harness's results: what generated the responses."""
        return {"t0s1_backend": self.backend.name, "t0s1_model": self.backend.model_name, "budget_forcing": asdict(self.defaults),
                "batch_size": self.batch_size, "policy": None if self.policy is None else self.policy.label()}

    # ---- scoring ----------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._hf_scorer().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._hf_scorer().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _hf_scorer(self):
        """The harness's HFLM around the loaded transformers model: its tokenisation of
        (context, continuation) pairs, rolling windows and batching."""
        if not isinstance(self.backend, EngineBackend) or self.backend.name != "transformers":
            raise UserError(
                f"This task scores continuations (loglikelihood), which needs backend=transformers; the {self.backend.name} "
                "backend only generates. Run multiple-choice and perplexity tasks with backend=transformers."
            )
        if self._scorer is None:
            from lm_eval.models.huggingface import HFLM

            lm = self.backend.lm
            self._scorer = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=self.batch_size or DEFAULT_BATCH_SIZE)
        self._scorer.cache_hook = self.cache_hook
        return self._scorer


def policy_from_model_args(generation: dict):
    """The policy named by ``policy``, ``n`` and ``policy_KEY`` model_args (taken out of
    ``generation``), or None."""
    name = generation.pop("policy", None)
    n = generation.pop("n", None)
    args = {key.removeprefix("policy_"): str(generation.pop(key)) for key in [k for k in generation if k.startswith("policy_")]}
    if name is None:
        if n is not None or args:
            raise UserError("--model_args: n and policy_* arguments need policy=NAME (e.g. policy=vote).")
        return None
    from t0s1.policies import make_policy

    try:
        count = None if n is None else int(n)
    except (TypeError, ValueError):
        raise UserError(f"--model_args: n must be a positive integer, got {n!r}.") from None
    return make_policy(str(name), args, n=count)


@dataclass
class _Job:
    """One request to generate: ``key`` is equal for requests that give the same text."""

    task: str | None
    prompt: Prompt
    budget: BudgetForcing
    until: list[str]
    unrepeatable: int | None = None  # sampling without a seed: never shared
    text: str | None = None

    @property
    def key(self) -> tuple:
        return (self.task, repr(self.prompt), self.budget, tuple(self.until), self.unrepeatable)


def harness_answer(text: str) -> str | None:
    """The answer a reply gives, for a policy's vote inside lm-eval, where the task's answer kind is
    not known: a math answer (``\\boxed{}``, "Final Answer:", the last number), else a choice letter,
    else the first line (so a multiple-choice or free-text task still votes, instead of every trace
    reading None and the first trace answering)."""
    from t0s1.evaluation.grading import extract_answer

    return extract_answer(text, "math") or extract_answer(text, "choice") or extract_answer(text, "exact")


def cut_at_stop(answer: str, until: Sequence[str]) -> str:
    """The answer up to the first occurrence of any stop string (the harness's ``until``)."""
    cut = len(answer)
    for stop in until:
        position = answer.find(stop)
        if position != -1:
            cut = min(cut, position)
    return answer[:cut]


def _batches(jobs: list[_Job], size: int | None):
    """Consecutive jobs of one task, ``size`` at a time (None: all of the task)."""
    batch: list[_Job] = []
    for job in jobs:
        if batch and (job.task != batch[0].task or (size is not None and len(batch) == size)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def _batch_size(batch_size, max_batch_size, backend: Backend) -> int | None:
    """An int, or None for "every request of a task at once"."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto")):
        if max_batch_size:
            return _batch_size(max_batch_size, None, backend)
        return DEFAULT_BATCH_SIZE if isinstance(backend, EngineBackend) else None
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be a positive integer or auto, got {batch_size!r}.") from None
    if size < 1 or isinstance(batch_size, bool):
        raise UserError(f"batch_size must be a positive integer or auto, got {batch_size!r}.")
    return size


def _tokenizer_and_profile(backend: Backend):
    """The tokenizer that renders the backend's prompts and its model profile (delimiters)."""
    if isinstance(backend, EngineBackend):
        return backend.lm.tokenizer, backend.lm.profile
    # vllm and openai drive budget forcing from the client, which holds both.
    forcing = getattr(backend, "forcing", None)
    tokenizer, profile = getattr(forcing, "tokenizer", None), getattr(forcing, "profile", None)
    if tokenizer is None or profile is None:
        raise UserError(f"The {backend.name} backend does not say which tokenizer and delimiters it uses.")
    return tokenizer, profile
