"""An Ollama ``Modelfile`` for an exported GGUF (``t0s1 export --ollama``): ``ollama create NAME -f
model.q8_0.Modelfile``.

Ollama writes prompts with Go templates, not the Jinja chat template inside the GGUF. When the
model's chat template renders a conversation exactly as ChatML does (every model t0s1 trains with
the s1 profile), the Modelfile carries the equivalent Go template and the template's default
system prompt; otherwise it leaves TEMPLATE out and Ollama falls back on the GGUF's own template.
Ollama has no budget forcing: the model thinks until it stops on its own.
"""

from __future__ import annotations

from pathlib import Path

from t0s1.files import write_text_atomic

CHATML_GO_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

MAX_CONTEXT = 32768
"""``num_ctx`` is the model's context up to this (Ollama's default, a few thousand tokens, would
cut long thinking; larger contexts cost memory on a laptop)."""

_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "V"},
]


def chatml_rendering(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def default_system_prompt(tokenizer) -> str | None:
    """The system turn a ChatML template adds when the conversation has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True)
    start = "<|im_start|>system\n"
    if text.startswith(start) and "<|im_end|>" in text:
        return text[len(start) : text.index("<|im_end|>")]
    return None


def is_chatml(tokenizer) -> bool:
    try:
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses this conversation is not plain ChatML
        return False
    return rendered == chatml_rendering(_PROBE)


def modelfile_text(gguf_name: str, tokenizer, *, stop: list[str], context_length: int | None) -> str:
    lines = [
        "# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME",
        "# Written by t0s1 export. Ollama has no budget forcing: the model thinks until it stops on its own;",
        "# use t0s1 generate / serve on the same file for thinking budgets and Wait.",
        f"FROM ./{gguf_name}",
    ]
    if is_chatml(tokenizer):
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        system = default_system_prompt(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# The chat template is not plain ChatML: Ollama uses the one inside the GGUF file.")
    for token in stop:
        lines.append(f'PARAMETER stop "{token}"')
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(context_length, MAX_CONTEXT)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``<gguf stem>.Modelfile`` beside the GGUF file."""
    return gguf_path.with_name(gguf_path.name.removesuffix(".gguf") + ".Modelfile")


def write_modelfile(gguf_path: Path, tokenizer, *, stop: list[str], context_length: int | None) -> Path:
    """The Modelfile beside the GGUF file, written whole or not at all; returns its path."""
    path = modelfile_path(gguf_path)
    write_text_atomic(path, modelfile_text(gguf_path.name, tokenizer, stop=stop, context_length=context_length))
    return path
