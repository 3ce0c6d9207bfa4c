"""Tiny random models that carry the real chat templates and special tokens of reasoning-model families.

Each family's chat template, the tokens that matter (content, id in the real model, ``special``
flag, bos/eos/pad, generation config) and where both were read live in
``tests/fixtures/chat_templates/<family>/``. ``build_family_model_dir`` trains a small byte-level BPE
tokenizer, adds the family's tokens with the real flags and writes a 2-layer random causal LM beside
it. Token ids differ from the real model; what holds is which strings are single tokens, which of
them are special, the template, bos/eos/pad and the end-of-sequence ids of the generation config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

CHAT_TEMPLATES_DIR = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

FAMILIES = (
    "qwen2.5-instruct",
    "qwen3",
    "qwen3-thinking-2507",
    "qwq",
    "deepseek-r1-distill-qwen",
    "smollm2",
    "gpt-oss",
)

# What the random model emits by itself every few dozen tokens: (end of thinking, end of turn).
# The ChatML families without thinking tokens end a thinking block the s1 way, by opening a new one.
NATURAL_STOPS = {
    "qwen2.5-instruct": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("</think>", "<|im_end|>"),
    "qwen3-thinking-2507": ("</think>", "<|im_end|>"),
    "qwq": ("</think>", "<|im_end|>"),
    "deepseek-r1-distill-qwen": ("</think>", "<｜end▁of▁sentence｜>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "gpt-oss": ("<|end|>", "<|return|>"),
}

# The tiny model has the real architecture where that is cheap; gpt-oss (mixture of experts) gets a Llama.
TINY_DIMENSIONS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    # Wide initialisation: peaked, well-separated logits, so greedy decoding has no near-ties.
    initializer_range=0.5,
)
"""The size of every tiny random test model (the families' and conftest's ChatML one)."""

_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "gpt_oss": "llama"}

_QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "How many r are in raspberry? Let me count the letters one by one. Wait, let me recount.",
    "What is 12 + 35 * 2? First 35 * 2 = 70, then 12 + 70 = 82. The answer is 82.",
    "<think>\nOkay, so the user asks for the sum. Hmm, Alternatively we could check it.\n</think>\n\n",
    "system user assistant think answer analysis final Final Answer: 0 1 2 3 4 5 6 7 8 9 + - * / = ( )",
    "So the final answer is \\boxed{42}. Considering the limited time, I have to give the solution now.",
]


def family_facts(family: str) -> dict:
    """The family's ``tokens.json``: real model id, tokenizer settings, added tokens with their real
    ids and ``special`` flags, and the model and generation configs' token ids."""
    return json.loads((_family_dir(family) / "tokens.json").read_text(encoding="utf-8"))


def family_chat_template(family: str) -> str:
    """The family's chat template, exactly as its model repository ships it."""
    return (_family_dir(family) / "chat_template.jinja").read_text(encoding="utf-8")


def build_family_model_dir(
    family: str, path: Path, *, seed: int = 0, drop_tokens: Iterable[str] = ()
) -> Path:
    """Write a tiny random causal LM of ``family`` with the family's real chat template and tokens.

    ``drop_tokens`` names added tokens of the real model to leave out, so that each of those strings
    becomes several ordinary tokens (``drop_tokens={"</think>"}`` gives a ``</think>`` delimiter made
    of ordinary tokens). The model ends its thinking and its turn by itself every few dozen tokens
    (``NATURAL_STOPS``), a dropped delimiter included: it then writes the pieces one after the other.
    """
    facts = family_facts(family)
    dropped = set(drop_tokens)
    _check_droppable(family, facts, dropped)
    tokenizer = _build_tokenizer(facts, dropped, family_chat_template(family))
    model = _build_model(facts, tokenizer, seed)
    _make_it_stop(model, tokenizer, NATURAL_STOPS[family])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The class the real tokenizer_config names decides, under AutoTokenizer, which class loads it.
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = facts["tokenizer"]["tokenizer_class"]
    config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _family_dir(family: str) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return CHAT_TEMPLATES_DIR / family


def _check_droppable(family: str, facts: dict, dropped: set[str]) -> None:
    added = {token["content"] for token in facts["added_tokens"]}
    if unknown := sorted(dropped - added):
        raise ValueError(f"{family} has no added tokens {unknown} to drop; it has {sorted(added)}")
    content = {token["id"]: token["content"] for token in facts["added_tokens"]}
    referenced = {facts["tokenizer"][key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for config in (facts["model_config"], facts["generation_config"]):
        for ids in config.values():
            referenced.update(content[i] for i in (ids if isinstance(ids, list) else [ids]))
    if needed := sorted(dropped & referenced):
        raise ValueError(f"{needed} are {family}'s bos/eos/pad/unk or config tokens and cannot be dropped")


def _build_tokenizer(facts: dict, dropped: set[str], chat_template: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kept = [token for token in facts["added_tokens"] if token["content"] not in dropped]
    # Tokens whose real ids come before the BPE vocabulary (SmolLM2's 0-16) keep that place; the
    # others (Qwen's 151643 and up) follow it, in the real order.
    leading = [token for token in kept if token["id"] < len(facts["added_tokens"])]
    trailing = sorted((token for token in kept if token not in leading), key=lambda token: token["id"])
    assert all(token["special"] for token in leading), "the trainer marks its tokens special"

    backend = Tokenizer(models.BPE())
    if facts["model_type"] in ("qwen2", "qwen3"):  # Qwen2.5, Qwen3, QwQ and the R1 Qwen distills
        # The pipeline of the Qwen vocabulary's tokenizer.json, which transformers' Qwen2Tokenizer
        # also rebuilds on load: the same text gives the same pieces whichever class reads it.
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[token["content"] for token in leading],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS * 5, trainer)
    backend.add_tokens(
        [AddedToken(token["content"], special=token["special"], normalized=False) for token in trailing]
    )
    settings = facts["tokenizer"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=settings["bos_token"],
        eos_token=settings["eos_token"],
        pad_token=settings["pad_token"],
        unk_token=settings["unk_token"],
        add_bos_token=settings["add_bos_token"],
        extra_special_tokens=[t for t in settings["additional_special_tokens"] if t not in dropped],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _build_model(facts: dict, tokenizer, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_ids = {key: _tiny_ids(facts, tokenizer, value) for key, value in facts["model_config"].items()}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        _ARCHITECTURES[facts["model_type"]],
        # Rows beyond the tokenizer's vocabulary, as real models have, so tests can check that
        # generation never samples an id the tokenizer cannot decode.
        vocab_size=len(tokenizer) + 37,
        **TINY_DIMENSIONS,
        bos_token_id=model_ids.get("bos_token_id"),
        eos_token_id=model_ids.get("eos_token_id"),
        pad_token_id=model_ids.get("pad_token_id"),
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    generation = facts["generation_config"]
    model.generation_config = GenerationConfig(
        **{key: _tiny_ids(facts, tokenizer, value) for key, value in generation.items()}
    )
    return model


def _tiny_ids(facts: dict, tokenizer, real_ids: int | list[int]) -> int | list[int]:
    """The tiny tokenizer's id(s) of the token(s) that have id(s) ``real_ids`` in the real model."""
    content = {token["id"]: token["content"] for token in facts["added_tokens"]}
    if isinstance(real_ids, list):
        return [tokenizer.convert_tokens_to_ids(content[i]) for i in real_ids]
    return tokenizer.convert_tokens_to_ids(content[real_ids])


@torch.no_grad()
def _make_it_stop(model, tokenizer, stops: tuple[str, str]) -> None:
    """A random model almost never emits a given token, so thinking would never end by itself.
    Give the first token of each stop the output row of a token the model does emit, slightly
    scaled, so both stops happen every few dozen tokens. A stop made of several tokens is then
    finished by making each of its tokens predict the next one."""
    stop_ids = [tokenizer.encode(stop, add_special_tokens=False) for stop in stops]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in ("How many r are in raspberry?", "What is 12 + 35 * 2?")
    ] + ["Wait, let", "Final Answer:"]
    counts = torch.zeros(model.config.vocab_size)
    # Ids past the tokenizer's vocabulary are never generated (they cannot be decoded).
    beyond_vocabulary = list(range(len(tokenizer), model.config.vocab_size))
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=40,
            do_sample=False,
            suppress_tokens=beyond_vocabulary,
            eos_token_id=None,
            pad_token_id=0,
        )
        counts += torch.bincount(out[0, ids.shape[1] :], minlength=model.config.vocab_size)
    in_stops = {i for ids in stop_ids for i in ids}
    frequent = [int(i) for i in torch.argsort(counts, descending=True) if counts[i] > 0 and int(i) not in in_stops]
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    for ids, source in zip(stop_ids, frequent[1:4:2]):
        head[ids[0]] = head[source] * 1.05
        for current, following in zip(ids, ids[1:]):
            _predict_next(embed, head, current, following)


def _predict_next(embed, head, current: int, following: int) -> None:
    """Make ``current`` be followed by ``following``: a huge embedding along a fresh direction swamps
    what the layers add at that position (they read it through their norms, so to every other
    position it is an ordinary input), and ``following``'s output row gains that direction."""
    direction = torch.randn(embed.shape[1])
    direction /= direction.norm()
    embed[current] = direction * 1e5
    head[following] += direction * 3.0
