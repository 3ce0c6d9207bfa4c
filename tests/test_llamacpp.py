"""The llama.cpp runner on the embedded GGUF: its logits equal a from-scratch evaluation with
llama-cpp-python's own ``Llama`` after prefill, steps, batching, forks, rollbacks and releases;
greedy decoding through it equals llama.cpp's own; bad files and short contexts are refused."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("llama_cpp")

from llamacpp_reference import LlamaCppGreedy, reference_llama  # noqa: E402

from t0s1 import UserError  # noqa: E402
from t0s1.backends.llamacpp import LlamaCppModel, LlamaCppRunner  # noqa: E402
from t0s1.models import embedded_gguf_path  # noqa: E402

CONTEXT = 256
THREADS = 1  # on a small shared CPU llama.cpp's spinning threads slow each other down; results do not depend on it

CHAT_TEXTS = [
    "<|im_start|>user\nHow many r are in the word raspberry?<|im_end|>\n<|im_start|>assistant\n<|im_start|>think\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 35 * 2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def gguf():
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def llama_model(gguf):
    model = LlamaCppModel(gguf)
    yield model
    model.close()


@pytest.fixture(scope="module")
def scratch(gguf):
    """From-scratch evaluations by llama-cpp-python's ``Llama`` (the reference's evaluator)."""
    llama = reference_llama(gguf, context_length=CONTEXT, n_threads=THREADS)
    yield LlamaCppGreedy(llama)
    llama.close()


@pytest.fixture(scope="module")
def prompts(scratch):
    return [scratch.llama.tokenize(text.encode(), add_bos=False, special=True) for text in CHAT_TEXTS]


@pytest.fixture
def make_runner(llama_model):
    runners = []

    def make(**kwargs):
        kwargs = {"context_length": CONTEXT, "max_slots": 4, "n_threads": THREADS} | kwargs
        runners.append(LlamaCppRunner(llama_model, **kwargs))
        return runners[-1]

    yield make
    for runner in runners:
        runner.close()


def from_scratch(scratch: LlamaCppGreedy, prompt: list[int], later: list[int]) -> torch.Tensor:
    scratch.prompt_length = len(prompt)
    scratch.evaluate(prompt + later)
    return scratch.last_logits()


def test_prefill_and_steps_equal_a_from_scratch_evaluation(make_runner, scratch, prompts):
    runner = make_runner()
    prompt = prompts[0]
    (slot,), logits = runner.add([prompt])
    assert logits.shape == (1, runner.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits[0], from_scratch(scratch, prompt, []))
    generated = []
    for step in range(1, 13):
        generated.append(int(logits[0].argmax()))
        logits = runner.step([slot], generated[-1:])
        if step in (1, 5, 12):
            assert torch.equal(logits[0], from_scratch(scratch, prompt, generated))
    assert runner.length(slot) == len(prompt) + 12


def test_a_batch_of_sequences_gives_each_the_logits_it_has_alone(make_runner, prompts):
    batched, alone = make_runner(), make_runner()
    slots, logits = batched.add(prompts)
    fed = [[] for _ in prompts]
    trace = []
    for _ in range(10):
        tokens = [int(t) for t in logits.argmax(-1)]
        for ids, token in zip(fed, tokens, strict=True):
            ids.append(token)
        logits = batched.step(slots, tokens)
        trace.append(logits)
    worst = 0.0
    for b, prompt in enumerate(prompts):
        (slot,), single = alone.add([prompt])
        for step, token in enumerate(fed[b]):
            single = alone.step([slot], [token])
            worst = max(worst, float((single[0] - trace[step][b]).abs().max()))
        alone.release(slot)
    assert worst == 0.0


def test_forks_continue_like_from_scratch_runs(make_runner, scratch, prompts):
    runner = make_runner()
    prompt = prompts[1]
    (parent,), logits = runner.add([prompt])
    shared = [int(logits[0].argmax())]
    runner.step([parent], shared)
    child = runner.fork(parent)
    assert child != parent and runner.length(child) == runner.length(parent)
    # Two different tokens in one batch, then each continues greedily on its own copy of the cache.
    branches = {parent: shared + [28], child: shared + [1202]}
    logits = runner.step([parent, child], [28, 1202])
    for _ in range(6):
        tokens = [int(t) for t in logits.argmax(-1)]
        branches[parent].append(tokens[0])
        branches[child].append(tokens[1])
        logits = runner.step([parent, child], tokens)
    assert torch.equal(logits[0], from_scratch(scratch, prompt, branches[parent]))
    assert torch.equal(logits[1], from_scratch(scratch, prompt, branches[child]))
    runner.release(parent)  # the fork keeps its own cache
    logits = runner.step([child], [13])
    assert torch.equal(logits[0], from_scratch(scratch, prompt, branches[child] + [13]))


def test_a_kept_copy_forks_like_its_prompt_prefilled_again(make_runner, scratch, prompts):
    """``keep`` saves a slot's cells apart from the context (it holds no slot); ``fork_kept`` starts
    slots from them after the original has left and the context has grown twice since: each goes on
    as the prompt prefilled from scratch."""
    runner = make_runner(max_slots=1)
    prompt = prompts[1]
    (slot,), logits = runner.add([prompt])
    kept = runner.keep(slot)
    runner.release(slot)
    assert runner.free_slots == 1
    runner.add([prompts[0], prompts[2]])  # 2 slots: the context grows, its streams with it
    first, second = runner.fork_kept(kept), runner.fork_kept(kept)  # 4 slots
    assert runner.max_slots == 4 and runner.length(first) == runner.length(second) == len(prompt)
    token = int(logits[0].argmax())
    after = runner.step([first, second], [token, 28])
    assert torch.equal(after[0], from_scratch(scratch, prompt, [token]))
    assert torch.equal(after[1], from_scratch(scratch, prompt, [28]))
    runner.drop_kept(kept)


def test_a_fork_whose_copy_fails_gives_its_slot_back(make_runner, scratch, prompts, monkeypatch):
    """The fork took a slot and stream before copying the cache; a failed copy kept them taken,
    holding no sequence, for the runner's lifetime."""
    runner = make_runner(max_slots=2)
    (slot,), logits = runner.add([prompts[0]])

    def failing_copy(*args):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(runner, "_copy_state", failing_copy)
    with pytest.raises(RuntimeError, match="copy failed"):
        runner.fork(slot)
    monkeypatch.undo()
    assert runner.free_slots == 1
    child = runner.fork(slot)  # the slot is there again, and the fork works
    after = runner.step([slot, child], [int(logits[0].argmax()), 28])
    assert torch.equal(after[1], from_scratch(scratch, prompts[0], [28]))


def test_rollback_then_another_token_equals_from_scratch(make_runner, scratch, prompts):
    runner = make_runner()
    prompt = prompts[0]
    (slot,), logits = runner.add([prompt])
    generated = []
    for _ in range(6):
        generated.append(int(logits[0].argmax()))
        logits = runner.step([slot], generated[-1:])
    runner.rollback(slot, 4)
    assert runner.length(slot) == len(prompt) + 2
    kept = generated[:2] + [1202]
    logits = runner.step([slot], [1202])
    assert torch.equal(logits[0], from_scratch(scratch, prompt, kept))
    with pytest.raises(ValueError, match="roll back"):
        runner.rollback(slot, runner.length(slot) + 1)


def test_released_slots_are_reused_without_leftovers(make_runner, scratch, prompts):
    runner = make_runner(max_slots=1)
    (slot,), logits = runner.add([prompts[0]])
    runner.step([slot], [int(logits[0].argmax())])
    runner.release(slot)
    with pytest.raises(ValueError, match="no sequence"):
        runner.step([slot], [1])
    (again,), logits = runner.add([prompts[1]])
    assert again == slot and runner.free_slots == 0 and runner.max_slots == 1
    assert torch.equal(logits[0], from_scratch(scratch, prompts[1], []))


def test_sequences_that_end_leave_the_streams_in_use_contiguous(make_runner, scratch, prompts, monkeypatch):
    """llama.cpp makes one pass over the weights per run of consecutive streams in a batch: when a
    sequence in the middle ends, the last one moves into its stream (cells copied), so the rest
    still decode in one run, and each goes on exactly as it would have."""
    runner = make_runner(max_slots=4)
    started = [prompts[0], prompts[1], prompts[0], prompts[1]]
    slots, logits = runner.add(started)
    tokens = {slot: [int(t)] for slot, t in zip(slots, logits.argmax(-1), strict=True)}
    runner.step(slots, [tokens[slot][-1] for slot in slots])
    for gone in (slots[0], slots[2]):
        runner.release(gone)
        del tokens[gone]
    batches = []
    decode = runner._ll.llama_decode
    monkeypatch.setattr(runner._ll, "llama_decode", lambda context, batch: batches.append(
        sorted(batch.seq_id[i][0] for i in range(batch.n_tokens))) or decode(context, batch))
    left = [slots[3], slots[1]]
    logits = runner.step(left, [1202, 28])
    assert batches == [[0, 1]]  # the two left are in streams 0 and 1: one run
    for row, (slot, token) in enumerate(zip(left, [1202, 28], strict=True)):
        prompt = started[slots.index(slot)]
        assert torch.equal(logits[row], from_scratch(scratch, prompt, tokens[slot] + [token])), slot


def context_cells(runner) -> int:
    return int(runner._ll.llama_n_ctx(runner._context))


def test_cache_is_taken_by_the_forks_that_exist(make_runner, scratch, prompts):
    """A fork copies the cells its parent holds into a free slot; with none free the context grows
    (twice the slots) and the sequences move over with their caches, so a runner holds cache for
    the sequences that exist, not for every fork that might."""
    runner = make_runner(max_slots=1)
    assert context_cells(runner) == CONTEXT
    prompt = prompts[1]
    (parent,), logits = runner.add([prompt])
    shared = [int(logits[0].argmax())]
    runner.step([parent], shared)
    children = []
    for expected_slots in (2, 4, 4):
        children.append(runner.fork(parent))
        assert runner.max_slots == expected_slots and context_cells(runner) == expected_slots * CONTEXT
    slots = [parent, *children]
    assert sorted(slots) == [0, 1, 2, 3] and runner.free_slots == 0
    branches = {slot: shared + [token] for slot, token in zip(slots, [28, 1202, 13, 1202], strict=True)}
    # Out of slot order: the runner decodes in slot order and hands the logits back in this one.
    order = [children[1], parent, children[2], children[0]]
    logits = runner.step(order, [branches[slot][-1] for slot in order])
    for _ in range(4):
        tokens = [int(t) for t in logits.argmax(-1)]
        for slot, token in zip(order, tokens, strict=True):
            branches[slot].append(token)
        logits = runner.step(order, tokens)
    for b, slot in enumerate(order):
        assert torch.equal(logits[b], from_scratch(scratch, prompt, branches[slot])), slot
    assert branches[children[0]] == branches[children[2]] != branches[parent]
    runner.release(children[0])
    assert runner.fork(parent) == children[0]  # the lowest free slot: the slots in use stay contiguous


def test_more_sequences_than_llama_cpp_holds_are_refused_with_a_hint(make_runner, prompts):
    runner = make_runner(max_slots=1)  # it may start with more: a closed runner's context
    runner.slot_limit = runner.max_slots + 1  # llama.cpp's limit is 256 sequences
    (parent,), _ = runner.add([prompts[2]])
    for _ in range(runner.max_slots):  # the slots it has, then one more by growing
        runner.fork(parent)
    with pytest.raises(RuntimeError, match="waves"):
        runner.fork(parent)
    with pytest.raises(RuntimeError, match="waves"):
        runner.add([prompts[0]])


def test_a_closed_runner_refuses_every_slot_operation(make_runner, prompts):
    """After close() the context's memory is freed: each operation says so instead of touching it."""
    runner = make_runner(max_slots=2)
    (slot,), _ = runner.add([prompts[0]])
    runner.close()
    for operation in (lambda: runner.release(slot), lambda: runner.rollback(slot, 1), lambda: runner.fork(slot),
                      lambda: runner.step([slot], [1])):
        with pytest.raises(RuntimeError, match="was closed"):
            operation()
    runner.close()  # twice is fine


def test_greedy_decoding_equals_llama_cpps_own(make_runner, gguf, prompts):
    runner = make_runner()
    prompt = prompts[2]
    (slot,), logits = runner.add([prompt])
    ours = []
    for _ in range(24):
        ours.append(int(logits[0].argmax()))
        logits = runner.step([slot], ours[-1:])
    llama = reference_llama(gguf, context_length=CONTEXT, n_threads=THREADS)
    try:
        theirs = []
        for token in llama.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
    finally:
        llama.close()
    assert ours == theirs


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="not a GGUF file"):
        LlamaCppRunner(fake)
    with pytest.raises(UserError, match="No GGUF file"):
        LlamaCppModel(tmp_path / "missing.gguf")


def test_a_context_too_small_is_refused(make_runner, llama_model, prompts):
    runner = make_runner(context_length=len(prompts[0]) + 1)
    with pytest.raises(UserError, match="context holds"):
        runner.add([prompts[0] + [28, 28]])
    (slot,), _ = runner.add([prompts[0]])
    runner.step([slot], [28])
    with pytest.raises(UserError, match="filled the llama.cpp context"):
        runner.step([slot], [28])
    with pytest.raises(UserError, match="trained on"):
        LlamaCppRunner(llama_model, context_length=llama_model.trained_context_length + 1)


def test_the_gguf_tokenizer_in_transformers_agrees_with_llama_cpp(gguf, scratch):
    """The backend renders prompts with transformers' tokenizer and feeds the ids to llama.cpp."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    llama = scratch.llama
    assert tokenizer.chat_template == llama.metadata["tokenizer.chat_template"]
    assert len(tokenizer) == llama.n_vocab()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 🤔"}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    texts = [*CHAT_TEXTS, rendered, "Wait", "\n<|im_start|>answer\nFinal Answer:", "  tabs\t\tünïcode\n\nand 42\\boxed{7}"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == llama.tokenize(text.encode(), add_bos=False, special=True), text
        assert llama.detokenize(ids, special=True).decode() == text


def test_a_gguf_tokenizer_is_kept_converted_and_loads_the_same(gguf, tmp_path, monkeypatch):
    """The first load of a GGUF file reads its tokenizer from the file and keeps a converted copy
    in the cache directory; the next load reads the copy, and it tokenizes, renders the chat
    template, decodes and detects the profile as the one read from the GGUF. A changed file is read
    again."""
    from t0s1.backends.llamacpp import gguf_tokenizer
    from t0s1.profiles import detect_profile

    monkeypatch.setenv("T0S1_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.symlink_to(gguf)
    read = gguf_tokenizer(model)
    [kept] = (tmp_path / "cache" / "gguf-tokenizers").iterdir()
    again = gguf_tokenizer(model)
    assert again.name_or_path == str(kept)  # the copy, not the GGUF
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 🤔"}]
    assert again.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        read.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    for text in [*CHAT_TEXTS, "Wait", "  tabs\t\tünïcode\n\nand 42\\boxed{7}"]:
        assert again(text, add_special_tokens=False).input_ids == read(text, add_special_tokens=False).input_ids, text
    assert again.get_vocab() == read.get_vocab() and again.all_special_ids == read.all_special_ids
    assert again.decode(list(range(0, 49152, 97))) == read.decode(list(range(0, 49152, 97)))
    assert detect_profile(again).profile == detect_profile(read).profile
    model.unlink()
    model.write_bytes(gguf.read_bytes())  # another file at the same path (a re-export): read again, replacing the copy
    assert gguf_tokenizer(model).name_or_path == str(model.parent)
    assert list((tmp_path / "cache" / "gguf-tokenizers").iterdir()) == [kept]
    assert gguf_tokenizer(model).name_or_path == str(kept)
    (kept / "tokenizer.json").write_text("{damaged")  # a copy that no longer loads is read again and replaced
    assert gguf_tokenizer(model).name_or_path == str(model.parent)
    assert gguf_tokenizer(model).name_or_path == str(kept)


def test_kept_gguf_tokenizers_are_bounded_the_least_recently_used_go(gguf, tmp_path, monkeypatch):
    from t0s1.backends import llamacpp

    monkeypatch.setenv("T0S1_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(llamacpp, "MAX_KEPT_TOKENIZERS", 2)
    models = []
    for name in "abc":
        models.append(tmp_path / f"{name}.gguf")
        models[-1].symlink_to(gguf)
    kept = tmp_path / "cache" / "gguf-tokenizers"
    llamacpp.gguf_tokenizer(models[0])
    time.sleep(0.01)
    llamacpp.gguf_tokenizer(models[1])
    time.sleep(0.01)
    assert llamacpp.gguf_tokenizer(models[0]).name_or_path.startswith(str(kept))  # a is used again: b is the oldest
    time.sleep(0.01)
    llamacpp.gguf_tokenizer(models[2])
    assert len(list(kept.iterdir())) == 2
    assert llamacpp.gguf_tokenizer(models[0]).name_or_path.startswith(str(kept))
    assert not llamacpp.gguf_tokenizer(models[1]).name_or_path.startswith(str(kept))  # b was forgotten


# ---- the backend: the engine's budget forcing on llama.cpp ----------------------------------------

BACKEND_PROMPTS = ["How many r are in the word raspberry?", "What is 17 * 23?", "Name a colour.", "What is 7 + 5?"]


@pytest.fixture(scope="module")
def gguf_lm(llama_model):
    """The embedded model on llama.cpp, as ``load_model`` returns it, with one thread."""
    from t0s1.backends.llamacpp import LlamaCppLoadedModel
    from t0s1.models import embedded_model_dir
    from t0s1.profiles import detect_profile
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    return LlamaCppLoadedModel(llama_model, tokenizer, detect_profile(tokenizer), "smollm2", n_threads=THREADS)


@pytest.fixture(scope="module")
def reference_lm(gguf, gguf_lm):
    from llamacpp_reference import ReferenceLM

    llama = reference_llama(gguf, context_length=1024, n_threads=THREADS)
    yield ReferenceLM(LlamaCppGreedy(llama), gguf_lm.tokenizer, gguf_lm.profile)
    llama.close()


@pytest.mark.parametrize("num_ignore", [0, 2])
@pytest.mark.parametrize("budget", [8, 64])
def test_backend_equals_the_from_scratch_reference(gguf_lm, reference_lm, budget, num_ignore):
    """s1's loop re-evaluating the whole sequence with llama.cpp after every intervention gives the
    same ids as the backend continuing every sequence in its KV cache, at batch 4 and batch 1."""
    from llamacpp_reference import reference_generate

    from t0s1 import BudgetForcing, generate

    settings = BudgetForcing(max_thinking_tokens=budget, num_ignore=num_ignore, max_answer_tokens=12)
    batched = generate(gguf_lm, BACKEND_PROMPTS, settings)
    alone = generate(gguf_lm, BACKEND_PROMPTS[1:2], settings)
    for prompt, result in zip(BACKEND_PROMPTS, batched, strict=True):
        expected = reference_generate(reference_lm, prompt, settings)
        assert result.thinking_token_ids == expected.thinking_token_ids, prompt
        assert result.answer_token_ids == expected.answer_token_ids, prompt
        assert (result.num_ignored, result.hit_budget) == (expected.num_ignored, expected.hit_budget)
    assert alone[0].thinking_token_ids == batched[1].thinking_token_ids
    assert alone[0].answer_token_ids == batched[1].answer_token_ids
    if budget == 8:
        assert any(r.hit_budget for r in batched), "want a budget that binds"
    else:
        assert not any(r.hit_budget for r in batched), "want a budget that does not bind"
        assert all(r.num_ignored == num_ignore for r in batched)


def test_backend_sweep_shares_the_thinking_and_equals_separate_runs(gguf_lm, monkeypatch):
    from t0s1 import BudgetForcing, generate, generate_sweep

    from test_sweep import count_fed_rows

    settings = [BudgetForcing(max_thinking_tokens=b, num_ignore=k, max_answer_tokens=8) for b in (0, 8, 64) for k in (0, 2)]
    fed = count_fed_rows(gguf_lm, monkeypatch)
    swept = generate_sweep(gguf_lm, BACKEND_PROMPTS, settings)
    swept_tokens = sum(fed)
    fed.clear()
    for j, setting in enumerate(settings):
        for i, result in enumerate(generate(gguf_lm, BACKEND_PROMPTS, setting)):
            assert swept[i][j].thinking_token_ids == result.thinking_token_ids
            assert swept[i][j].answer_token_ids == result.answer_token_ids
    separate_tokens = sum(fed)
    all_thinking = sum(r.thinking_tokens for row in swept for r in row)
    widest_thinking = sum(row[-1].thinking_tokens for row in swept)  # 64 tokens and 2 Waits: the trace
    # The thinking is fed once per prompt (the widest setting's), not once per setting (a fork
    # feeds a few ids of its own where it leaves the trace).
    assert all_thinking > widest_thinking
    assert swept_tokens < separate_tokens - (all_thinking - widest_thinking) / 2


def test_a_sweep_of_more_rows_than_llama_cpp_holds_starts_prompts_as_rows_free_up(gguf_lm, monkeypatch):
    """17 prompts x 15 budgets: a trace and 15 forks per prompt, 272 rows where llama.cpp holds 256
    sequences. The sweep starts the prompts that fit even if every setting forks at once, the last
    one when an earlier one has finished, on one runner that starts with a row per trace, grows as
    forks exist and never passes 256; the results equal separate runs."""
    from t0s1 import BudgetForcing, generate, generate_sweep

    prompts = [f"What is {i} + {i}?" for i in range(17)]
    settings = [BudgetForcing(max_thinking_tokens=b, max_answer_tokens=1) for b in range(1, 16)]
    assert len(prompts) * (1 + len(settings)) > gguf_lm.max_sequences == 256
    runners = []
    original = gguf_lm.new_runner

    def recording_runner(**kwargs):
        runners.append((kwargs, original(**kwargs)))
        return runners[-1][1]

    monkeypatch.setattr(gguf_lm, "new_runner", recording_runner)
    swept = generate_sweep(gguf_lm, prompts, settings)
    # 16 x 16 rows, then the last prompt; a row per trace and one for the forks to start with
    assert [kwargs["rows"] for kwargs, _ in runners] == [32]
    assert all(runner.max_slots <= 256 for _, runner in runners)
    assert runners[0][1].max_slots > 32  # the forks took slots as they came
    monkeypatch.undo()
    for j in (0, 7, 14):
        for i, result in enumerate(generate(gguf_lm, prompts, settings[j])):
            assert swept[i][j].thinking_token_ids == result.thinking_token_ids, (i, j)
            assert swept[i][j].answer_token_ids == result.answer_token_ids, (i, j)


def test_deepconf_online_forks_its_later_traces_from_the_kept_prefill(gguf_lm, monkeypatch):
    """On llama.cpp too, DeepConf online's later traces (each starting after the warm-up has left)
    fork the prompt's kept prefill instead of prefilling it again, and sample as trace j alone."""
    from t0s1 import BudgetForcing
    from t0s1.forcing import generate
    from t0s1.policies import make_policy, rules
    from t0s1.policies.run import generate_with_policy

    monkeypatch.setattr(rules, "warmup_threshold", lambda lowest, keep_percent: float("-inf"))  # no trace stops early
    prefilled, original = [], LlamaCppRunner.add
    monkeypatch.setattr(LlamaCppRunner, "add", lambda self, ids: (prefilled.append(len(ids)), original(self, ids))[1])
    budget = BudgetForcing(max_thinking_tokens=12, max_answer_tokens=4, temperature=0.8, seed=3)
    answers = iter(range(100))  # never a consensus: every trace runs
    policy = make_policy("deepconf", {"mode": "online", "warmup": "2", "window": "4"}, n=4)
    out = generate_with_policy(gguf_lm, [BACKEND_PROMPTS[1]], budget, policy, extract=lambda text: str(next(answers)))[0]
    assert prefilled == [1] and len(out.traces) == 4
    for j in (2, 3):  # later traces run alone in their wave, as trace j alone does
        alone = generate(gguf_lm, [BACKEND_PROMPTS[1]], BudgetForcing(max_thinking_tokens=12, max_answer_tokens=4, temperature=0.8, seed=3 + j))[0]
        assert out.traces[j].result.thinking_token_ids == alone.thinking_token_ids


def test_more_prompts_than_llama_cpp_holds_start_as_others_finish(gguf_lm):
    """257 prompts in one generate call, where llama.cpp holds 256 sequences: the last starts when
    one has finished, and each result is the prompt's own."""
    from t0s1 import BudgetForcing, generate

    prompts = [f"What is {i} + {i}?" for i in range(257)]
    settings = BudgetForcing(max_thinking_tokens=2, max_answer_tokens=1)
    results = generate(gguf_lm, prompts, settings)
    assert len(results) == 257 and all(r is not None for r in results)
    for i in (0, 255, 256):
        [alone] = generate(gguf_lm, [prompts[i]], settings)
        assert (results[i].thinking_token_ids, results[i].answer_token_ids) == (alone.thinking_token_ids, alone.answer_token_ids)


def test_backend_streams_cancels_and_samples_reproducibly(gguf_lm):
    from t0s1 import BudgetForcing, generate

    streamed = {}

    def on_delta(index, channel, text):
        streamed[(index, channel)] = streamed.get((index, channel), "") + text

    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=10)
    results = generate(gguf_lm, BACKEND_PROMPTS, settings, on_delta=on_delta, is_cancelled=lambda i: i == 3)
    for i, result in enumerate(results[:3]):
        assert streamed.get((i, "thinking"), "") == result.thinking
        assert streamed.get((i, "answer"), "") == result.answer
    assert results[3].finish_reason == "cancelled" and results[3].thinking_tokens == 0
    sampled = BudgetForcing(max_thinking_tokens=30, max_answer_tokens=8, temperature=1.0, seed=11)
    first = generate(gguf_lm, BACKEND_PROMPTS[:2], [sampled, sampled])
    again = generate(gguf_lm, [BACKEND_PROMPTS[3], BACKEND_PROMPTS[0]], [settings, sampled])
    assert first[0].thinking_token_ids == again[1].thinking_token_ids  # the seed, not the neighbours, decides
    assert first[0].seed == 11


def test_the_command_line_uses_llama_cpp_for_a_gguf_file_and_refuses_bad_input(gguf, tmp_path):
    import json

    from typer.testing import CliRunner

    from t0s1.cli import app
    from t0s1.models import choose_backend

    assert choose_backend(str(gguf), "cpu") == "llamacpp" and choose_backend("smollm2-135m-instruct", "cpu") == "llamacpp"
    assert choose_backend("some/model-dir", "cpu") == "transformers"
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "What is 7 + 5?", "--model", str(gguf), "--json", "--max-thinking-tokens", "8",
                                 "--max-answer-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thinking_tokens"] <= 8
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("{}")
    for model, extra, message in [
        (str(not_gguf), [], "not a GGUF file"),
        (str(tmp_path), [], "runs a .gguf model file"),
        (str(gguf), ["--max-thinking-tokens", "9000"], "does not fit the model's context"),
    ]:
        result = runner.invoke(app, ["generate", "Hi", "--model", model, "--backend", "llamacpp", *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output.replace("\n", " ")


def test_the_server_batches_requests_on_llama_cpp(gguf_lm):
    """Concurrent chat requests share llama.cpp's batch; each reply equals the request run alone."""
    import concurrent.futures

    import httpx
    import openai

    from t0s1 import BudgetForcing, generate
    from t0s1.serving.server import create_app, serve_in_background

    defaults = BudgetForcing(max_thinking_tokens=24, num_ignore=1, max_answer_tokens=8)
    with serve_in_background(create_app(gguf_lm, defaults, max_batch=4, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)

        def ask(question):
            return client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, BACKEND_PROMPTS))
        health = httpx.get(f"{url}/health").json()
    for question, reply in zip(BACKEND_PROMPTS, replies, strict=True):
        [alone] = generate(gguf_lm, [question], defaults)
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == (alone.thinking, alone.answer)
    assert health["requests"] == 4 and health["largest_batch"] > 1  # they ran side by side


class _AmxCpu:
    """llama.cpp's bindings as on a CPU with AMX: its system information says so."""

    @staticmethod
    def llama_print_system_info() -> bytes:
        return b"CPU : AVX512 = 1 | AMX_INT8 = 1 | "


@pytest.fixture
def amx_check(tmp_path, monkeypatch):
    """``amx_kernels_work`` with a fresh cache directory, its in-process memo cleared around the test."""
    from t0s1.backends import llamacpp

    monkeypatch.setenv("T0S1_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(llamacpp.AMX_SETTING, raising=False)
    llamacpp.amx_kernels_work.cache_clear()
    yield llamacpp
    llamacpp.amx_kernels_work.cache_clear()


def test_a_build_whose_amx_kernels_crash_is_found_once_and_remembered(amx_check, tmp_path, monkeypatch, caplog):
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(amx_check, "_AMX_CHECK", crash)
    assert amx_check.amx_kernels_work(_AmxCpu) is False
    assert "AMX kernels crash" in caplog.text and "T0S1_LLAMACPP_AMX" in caplog.text
    assert list(json.loads((tmp_path / "llamacpp-amx.json").read_text()).values()) == [False]
    # The answer is kept for this build: a check that would pass is not run again.
    monkeypatch.setattr(amx_check, "_AMX_CHECK", "pass")
    amx_check.amx_kernels_work.cache_clear()
    assert amx_check.amx_kernels_work(_AmxCpu) is False


def test_the_amx_setting_decides_without_a_check_and_a_bad_value_is_refused(amx_check, monkeypatch):
    monkeypatch.setattr(amx_check, "_AMX_CHECK", "raise SystemExit(1)")
    for value, works in (("1", True), ("0", False)):
        monkeypatch.setenv(amx_check.AMX_SETTING, value)
        amx_check.amx_kernels_work.cache_clear()
        assert amx_check.amx_kernels_work(_AmxCpu) is works
    monkeypatch.setenv(amx_check.AMX_SETTING, "yes")
    amx_check.amx_kernels_work.cache_clear()
    with pytest.raises(UserError, match="T0S1_LLAMACPP_AMX must be 1"):
        amx_check.amx_kernels_work(_AmxCpu)


def test_the_installed_build_runs_llama_cpps_amx_kernels_where_the_cpu_has_them(amx_check):
    """``make install`` builds llama-cpp-python so that its AMX kernels work (Makefile, LLAMA_CPP_CMAKE_ARGS)."""
    bindings = amx_check._bindings()
    if b"AMX_INT8 = 1" not in bindings.llama_print_system_info():
        pytest.skip("llama.cpp reports no AMX on this CPU (or this build has no AMX kernels)")
    assert amx_check.amx_kernels_work(bindings) is True


def test_a_closed_runners_context_serves_the_next_runner_of_its_shape(llama_model, make_runner, scratch, prompts):
    first = make_runner(max_slots=4)
    first.add(prompts)
    context = first._context
    first.close()
    assert first._context is None  # the closed runner refuses slot operations (test above)
    second = make_runner(max_slots=2)
    assert second._context == context and second.max_slots == 4 and second.free_slots == 4
    slots, logits = second.add(prompts[1:2])
    later = [int(logits[0].argmax())]
    step = second.step(slots, later)
    assert torch.equal(step[0], from_scratch(scratch, prompts[1], later))
    longer = make_runner(context_length=2 * CONTEXT)  # another shape: a context of its own
    assert longer._context != context
