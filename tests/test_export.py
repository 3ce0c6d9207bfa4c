"""`t0s1 export`: bad input (exit 2, OUT untouched), and the exported GGUF on llama.cpp against the
transformers engine on the source directory (greedy budget forcing, the reasoning profile), for a
directory written the way `t0s1 train` writes it and for a LoRA adapter directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.export import GGUF_PROFILE_KEY, QUANT_TYPES, export_gguf

FIDELITY = 0.95
"""Share of prompts whose greedy budget-forced thinking and answer must be equal on both engines."""


def export(*args: str):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def error_text(result) -> str:
    return " ".join(result.output.split())


# ---- bad input: exit code 2 with the reason, nothing written at OUT ------------------------------


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "dataset_info.json").write_text("{}")
    out = tmp_path / "out.gguf"
    result = export(data, "--gguf", out)
    assert result.exit_code == 2
    assert "not a model directory" in error_text(result) and "config.json" in error_text(result)
    result = export(tmp_path / "missing", "--gguf", out)
    assert result.exit_code == 2 and "No model directory" in error_text(result)
    (tmp_path / "weights-gone").mkdir()
    (tmp_path / "weights-gone" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = export(tmp_path / "weights-gone", "--gguf", out)
    assert result.exit_code == 2 and "no weights" in error_text(result)
    for name, damaged in (("adapter-list", "[1]"), ("adapter-broken", "{not json")):  # crashed with a traceback before
        adapter = tmp_path / name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(damaged)
        (adapter / "adapter_model.safetensors").write_bytes(b"")
        result = export(adapter, "--gguf", out)
        assert result.exit_code == 2 and "is not a readable JSON object" in error_text(result)
    assert not out.exists()


def test_an_unknown_quant_type_and_a_taken_or_odd_output_path_are_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "model.gguf"
    result = export(tiny_model_dir, "--gguf", out, "--quant", "q9_9")
    assert result.exit_code == 2
    assert "Unknown quant type 'q9_9'" in error_text(result) and "q4_k_m" in error_text(result)
    out.write_bytes(b"an earlier export")
    result = export(tiny_model_dir, "--gguf", out)
    assert result.exit_code == 2 and "exists" in error_text(result) and "--overwrite" in error_text(result)
    assert out.read_bytes() == b"an earlier export"
    result = export(tiny_model_dir, "--gguf", tmp_path / "model.bin")
    assert result.exit_code == 2 and ".gguf" in error_text(result)
    result = export(tiny_model_dir, "--gguf", tiny_model_dir / "inside.gguf")
    assert result.exit_code == 2 and "outside the model directory" in error_text(result)
    result = CliRunner().invoke(app, ["train", "quickstart", "--gguf", "q9_9"])  # refused before any training
    assert result.exit_code == 2 and "Unknown quant type" in error_text(result)
    (tmp_path / "afile").write_text("not a folder")
    result = export(tiny_model_dir, "--gguf", tmp_path / "afile" / "model.gguf")
    assert result.exit_code == 2 and "is a file, not a folder" in error_text(result)
    (tmp_path / "new.Modelfile").write_text("FROM ./mine.gguf")  # a Modelfile of the user's, beside a new OUT
    result = export(tiny_model_dir, "--gguf", tmp_path / "new.gguf", "--ollama")
    assert result.exit_code == 2 and "new.Modelfile' exists" in error_text(result)
    assert (tmp_path / "new.Modelfile").read_text() == "FROM ./mine.gguf" and not (tmp_path / "new.gguf").exists()


def test_the_default_output_is_beside_the_path_given_even_a_link(tmp_path, tiny_model_dir):
    from t0s1.export import default_gguf_path

    link = tmp_path / "model"
    link.symlink_to(tiny_model_dir)
    assert default_gguf_path(link, "q8_0") == tmp_path / "model.q8_0.gguf"


def test_an_architecture_the_converter_does_not_know_is_refused(tmp_path, tiny_model_dir):
    model = tmp_path / "strange"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["StrangeNewForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "strange.gguf"
    result = export(model, "--gguf", out)
    assert result.exit_code == 2, result.output
    assert "cannot convert the architecture ['StrangeNewForCausalLM']" in error_text(result)
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_smollm2_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the embedded SmolLM2's tokenizer (one llama.cpp knows): converts in
    seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from model_families import TINY_DIMENSIONS
    from t0s1.models import embedded_model_dir

    path = tmp_path_factory.mktemp("tiny-smollm2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), **TINY_DIMENSIONS, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_failed_conversion_leaves_the_output_as_it_was(tmp_path, tiny_model_dir, tiny_smollm2_dir):
    """The tiny model's tokenizer (trained for the tests) is none llama.cpp knows: the converter
    refuses it. Weights cut short fail it while it writes. Neither leaves a file behind."""
    out = tmp_path / "model.gguf"
    result = export(tiny_model_dir, "--gguf", out)
    assert result.exit_code == 2 and "does not recognise the tokenizer" in error_text(result)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_smollm2_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out.write_bytes(b"an earlier export")
    result = export(broken, "--gguf", out, "--overwrite")
    assert result.exit_code == 2 and "converter failed" in error_text(result)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model.gguf"]  # no temporary folder left


def test_an_export_removes_what_a_killed_one_left_and_checks_the_modelfiles_inputs_first(tmp_path, tiny_smollm2_dir):
    """A killed export leaves its working folder (converted weights) beside OUT: the next export
    to OUT removes it, not one of a process still running. A generation config that is not JSON
    stops --ollama before anything is converted."""
    import subprocess

    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    alive = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        abandoned = out.parent / f".model.gguf.t0s1-export.{gone.pid}.x1"
        running = out.parent / f".model.gguf.t0s1-export.{alive.pid}.x2"
        for folder in (abandoned, running):
            folder.mkdir()
            (folder / "converted.f32.gguf").write_bytes(b"weights")
        result = export(tiny_smollm2_dir, "--gguf", out, "--quant", "q8_0")
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.parent.iterdir()) == [running.name, "model.gguf"]
    finally:
        alive.kill()
    model = tmp_path / "model"
    shutil.copytree(tiny_smollm2_dir, model)
    (model / "generation_config.json").write_text("{not json")
    result = export(model, "--gguf", tmp_path / "other.gguf", "--ollama")
    assert result.exit_code == 2 and "not a generation config" in error_text(result)
    assert not (tmp_path / "other.gguf").exists() and not list(tmp_path.glob(".other.gguf*"))


def test_a_small_model_exports_to_a_k_quant_that_llama_cpp_runs(tmp_path, tiny_smollm2_dir):
    import t0s1
    from t0s1.models import load_model

    out = tmp_path / "small.q4_k_m.gguf"
    result = export(tiny_smollm2_dir, "--gguf", out, "--quant", "Q4_K_M")
    assert result.exit_code == 0, result.output
    assert f"Wrote {out} (q4_k_m" in error_text(result) and "reasoning profile s1 from the chat template" in error_text(result)
    lm = load_model(str(out), backend="llamacpp")
    assert lm.profile.name == "s1" and lm.vocab_size == 49152
    (answer,) = t0s1.generate(lm, ["What is 2 + 2?"], t0s1.BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4))
    assert 0 < answer.thinking_tokens <= 8
    again = export(tiny_smollm2_dir, "--gguf", out, "--quant", "q8_0", "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_output_named_like_the_converters_own_file_is_written_whole(tmp_path, tiny_smollm2_dir):
    """The converter's file and the quantizer's output share a folder: an OUT whose name matches the
    converter's must not make the quantizer read the file it is writing (that was a bus error)."""
    from t0s1.models import load_model

    for quant in ("f32", "q8_0"):
        out = tmp_path / quant / "model.f32.gguf"
        result = export(tiny_smollm2_dir, "--gguf", out, "--quant", quant)
        assert result.exit_code == 0, result.output
        assert load_model(str(out), backend="llamacpp").vocab_size == 49152


def test_every_quant_type_names_a_llama_cpp_file_type():
    from llama_cpp import llama_cpp

    assert {"f16", "q8_0", "q4_k_m"} <= set(QUANT_TYPES)
    for name, (constant, _) in QUANT_TYPES.items():
        assert isinstance(getattr(llama_cpp, constant), int), name


# ---- fidelity on the embedded SmolLM2 -------------------------------------------------------------

GENERAL = [
    "What is 17 * 23?", "How many r are in the word raspberry?", "Name three prime numbers greater than 50.",
    "Why is the sky blue?", "Write a haiku about rain.", "What is the capital of Australia?",
    "Explain photosynthesis in one sentence.", "Who wrote Hamlet?",
]
"""Open questions: the base model's thinking on them is unsure (many near-ties between its top tokens)."""

ARITHMETIC = 12
"""Quickstart problems (held out, seed 3) first in the prompt list: the task t0s1 trains on."""


def prompts() -> list[str]:
    from t0s1.quickstart.problems import generate_problems

    _, test = generate_problems(0, ARITHMETIC, seed=3)
    return [row["question"] for row in test] + GENERAL


BUDGET = dict(max_thinking_tokens=48, num_ignore=1, max_answer_tokens=24)
"""A budget that binds for most prompts, with one Wait: the forced end and the Wait both run."""


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 as safetensors, saved the way `t0s1 train` saves a model: the tokenizer
    with its chat template and the recorded reasoning profile."""
    from transformers import AutoTokenizer

    from t0s1.models import embedded_model_dir
    from t0s1.profiles import S1, record_profile

    path = tmp_path_factory.mktemp("trained") / "smollm2-s1"
    shutil.copytree(embedded_model_dir(), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    record_profile(tokenizer, S1)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A LoRA adapter over the embedded SmolLM2, written as `t0s1 train` writes one without
    merge_lora (adapter weights, the tokenizer): its B matrices random, so that it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t0s1.models import embedded_model_dir

    path = tmp_path_factory.mktemp("lora") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.01
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path


def greedy_results(model: str, backend: str):
    import t0s1
    from t0s1.models import load_model

    lm = load_model(model, device="cpu", backend=backend)
    return lm, t0s1.generate(lm, prompts(), t0s1.BudgetForcing(**BUDGET))


def agreement(reference, results) -> tuple[float, list[int]]:
    """The share of equal (thinking, answer) pairs, and the indices of the others."""
    differ = [i for i, (a, b) in enumerate(zip(reference, results, strict=True)) if (a.thinking, a.answer) != (b.thinking, b.answer)]
    return 1 - len(differ) / len(reference), differ


@pytest.mark.slow
def test_the_exported_f16_and_q8_0_files_generate_what_the_source_directory_does(tmp_path, trained_dir, one_torch_thread):
    import gguf
    from transformers import AutoTokenizer

    reference_lm, reference = greedy_results(str(trained_dir), "transformers")
    assert reference_lm.detection.profile.name == "s1"
    assert any(r.num_ignored for r in reference)  # the Wait ran

    f16 = tmp_path / "model.f16.gguf"
    result = export(trained_dir, "--gguf", f16, "--quant", "f16", "--ollama")
    assert result.exit_code == 0, result.output
    assert "reasoning profile s1 recorded by t0s1 train" in error_text(result)
    q8 = export_gguf(trained_dir, tmp_path / "model.q8_0.gguf", "q8_0", log=lambda _: None)
    assert q8.size_bytes < 0.6 * f16.stat().st_size

    # What llama.cpp, LM Studio and Ollama read: the chat template, the special tokens, the profile.
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    fields = gguf.GGUFReader(f16).fields
    text = lambda key: fields[key].contents()  # noqa: E731
    assert text("tokenizer.chat_template") == tokenizer.chat_template
    assert text("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text("tokenizer.ggml.bos_token_id") == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert text(GGUF_PROFILE_KEY) == "s1"
    modelfile = (tmp_path / "model.f16.Modelfile").read_text()
    assert "FROM ./model.f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile

    # f16 on every prompt. q8_0 on the arithmetic problems: on the open questions the untrained
    # format leaves the base model between near-equal tokens, and 8-bit weights tip some of them
    # (docs/export.md: 12 of 20 equal, first differences where the top two logits are close); a
    # broken export (template, tokens, weights) would differ everywhere, so at least half must hold.
    for path, count in ((f16, len(reference)), (q8.path, ARITHMETIC)):
        lm, results = greedy_results(str(path), "llamacpp")
        assert lm.detection.profile == reference_lm.detection.profile
        assert "recorded by t0s1 train" in lm.detection.reasons[0]
        share, differ = agreement(reference[:count], results[:count])
        assert share >= FIDELITY, (path.name, differ, [(reference[i].thinking, results[i].thinking) for i in differ])
        assert agreement(reference, results)[0] >= 0.5, path.name


@pytest.mark.slow
def test_a_lora_adapter_directory_is_merged_and_matches_the_adapter_on_transformers(tmp_path, lora_dir, one_torch_thread):
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from t0s1.models import embedded_model_dir

    reference_lm, reference = greedy_results(str(lora_dir), "transformers")
    result = export_gguf(lora_dir, tmp_path / "adapter.f16.gguf", "f16", log=lambda _: None)
    assert result.merged_lora and not result.recorded and result.profile == "s1"
    # The adapter is in the weights: a merged layer differs from the base model's by more than twice
    # f16's largest rounding error there (about 1e-3: its weights reach 2.9).
    tensor = next(t for t in gguf.GGUFReader(result.path).tensors if t.name == "blk.0.ffn_down.weight")
    merged = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32))
    base = load_file(embedded_model_dir() / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert merged.shape == base.shape and (merged - base).abs().max() > 0.0025
    lm, results = greedy_results(str(result.path), "llamacpp")
    assert lm.detection.profile == reference_lm.detection.profile
    share, differ = agreement(reference, results)
    assert share >= FIDELITY, differ
