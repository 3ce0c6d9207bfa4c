"""Shared fixtures: a tiny random ChatML model built from a config, and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model_families import TINY_DIMENSIONS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "How many r are in raspberry? Let me count the letters one by one. Wait, let me recount.",
    "What is 12 + 35 * 2? First 35 * 2 = 70, then 12 + 70 = 82. The answer is 82.",
    "system user assistant think answer Final Answer: Answer: 0 1 2 3 4 5 6 7 8 9 + - * / = ( )",
    "Hmm, Alternatively we could check the result. So the final answer is \\boxed{42}.",
]


def build_tiny_model_dir(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama with a byte-level BPE ChatML tokenizer to ``path``.

    The embedding matrix has 37 rows more than the tokenizer's vocabulary, as many real models do,
    so tests can check that generation never samples an id the tokenizer cannot decode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 37,
        **TINY_DIMENSIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    _make_it_stop(model, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def _make_it_stop(model, tokenizer) -> None:
    """A random model almost never emits a given token, so thinking would never end by itself.
    Give ``<|im_start|>`` (end of thinking) and ``<|im_end|>`` (end of turn) the output rows of
    tokens it does emit, slightly scaled, so both stops happen every few dozen tokens."""
    prompts = ["How many r", "What is 12", "Wait, let", "Final Answer:"]
    counts = torch.zeros(model.config.vocab_size)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        counts += torch.bincount(out[0, ids.shape[1] :], minlength=model.config.vocab_size)
    frequent = [int(i) for i in torch.argsort(counts, descending=True) if counts[i] > 0]
    head = model.get_output_embeddings().weight
    for stop, source in zip(("<|im_start|>", "<|im_end|>"), frequent[1:4:2]):
        head[tokenizer.convert_tokens_to_ids(stop)] = head[source] * 1.05


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny random ChatML model (loads in well under a second)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from t0s1.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct on PyTorch (converted once into the user cache, then
    reloaded); ``smollm2_gguf`` is the same model on llama.cpp."""
    from t0s1.models import EMBEDDED_MODEL, load_model

    return load_model(EMBEDDED_MODEL, device="cpu", backend="transformers")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a small CPU shared with other processes (the subprocess
    tests, a busy CI machine) one thread is several times faster than oversubscribed ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The benchmark files beside the checkout (``../shared/data``), or ``$T0S1_DATA_DIR``."""
    path = Path(os.environ.get("T0S1_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path}")
    return path
