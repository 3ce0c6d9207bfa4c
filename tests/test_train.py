"""`t0s1 train`: completion-only labels in the real batch, DDP on 2 CPU processes, LoRA save/merge,
recipe overrides, resuming after SIGKILL, and the quickstart recipe on the embedded model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from test_prepare import s1k_rows, write_jsonl
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.data.prepare import prepare
from t0s1.training.sft import main as train_main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    """8 s1K-format traces rendered for the tiny model."""
    base = tmp_path_factory.mktemp("prepared")
    source = write_jsonl(base / "s1k.jsonl", s1k_rows(8))
    prepare(str(source), str(tiny_model_dir), base / "data")
    return base / "data"


def tiny_recipe(path: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_dir),
        "output_dir": str(path.parent / "out"),
        "max_steps": 4,
        "learning_rate": 1.0e-3,
        "per_device_train_batch_size": 2,
        "max_length": 256,
        "logging_steps": 1,
        "save_strategy": "no",
        "activation_checkpointing": False,
        "report_to": "none",
        "seed": 0,
        **overrides,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_batch_fed_to_the_model_trains_only_the_completion(tmp_path, tiny_model_dir, prepared, monkeypatch):
    """Capture the real batches the loss is computed on: prompt tokens are -100; thinking, answer and
    end token are trained."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    batches = []
    original_train = SFTTrainer.train

    def train_with_hook(self, *args, **kwargs):
        compute_loss = self.compute_loss

        def capture(model, inputs, *rest, **options):
            if model.training:
                batches.append({key: inputs[key].clone() for key in ("input_ids", "labels", "attention_mask")})
            return compute_loss(model, inputs, *rest, **options)

        self.compute_loss = capture
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", train_with_hook)
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared)
    train_main([str(recipe), "--max_steps", "3"])
    assert len(batches) == 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_from_disk(str(prepared))["train"].to_list()
    by_prompt = {tokenizer.decode(tokenizer(e["prompt"])["input_ids"]): e for e in examples}
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for batch in batches:
        for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            length = int(mask.sum())
            ids, labels = input_ids[:length].tolist(), labels.tolist()
            trained = [i for i, label in enumerate(labels) if label != -100]
            start = trained[0]
            prompt_text = tokenizer.decode(ids[:start])
            example = by_prompt[prompt_text]  # the untrained part is exactly the prompt
            assert labels[:start] == [-100] * start
            assert trained == list(range(start, length))  # every completion token is trained, padding is not
            assert labels[start:length] == ids[start:length]
            assert tokenizer.decode(ids[start:length]) == example["completion"]
            assert example["completion"].startswith("<|im_start|>think\n") and "<|im_start|>answer\nAnswer: " in (
                example["completion"]
            )
            assert ids[length - 1] == end_id and labels[length - 1] == end_id  # the model learns to stop
            checked += 1
    assert checked == 6


def test_on_a_cpu_the_loss_projects_only_the_completion_and_equals_trls_loss_gradients_and_metrics(
    tmp_path, tiny_model_dir, prepared, monkeypatch
):
    """The CPU loss (t0s1.training.loss) against TRL's fused head on the same batch: the same loss,
    gradients, entropy and token accuracy, with the LM head applied to fewer positions; a batch
    whose logits would pass the size bound goes to TRL's head."""
    from trl import SFTTrainer

    from t0s1.training import loss as completion_loss

    trainers = []
    original_train = SFTTrainer.train

    def keep_trainer(self, *args, **kwargs):
        trainers.append(self)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", keep_trainer)
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared, per_device_train_batch_size=4)
    train_main([str(recipe), "--max_steps", "1"])
    trainer = trainers[0]
    assert isinstance(trainer, SFTTrainer) and type(trainer) is not SFTTrainer
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    model.train()
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(out.shape[:-1].numel()))

    def loss_gradients_and_metrics(compute_loss):
        model.zero_grad()
        head_rows.clear()
        loss = compute_loss(trainer, model, dict(batch))
        loss.backward()
        metrics = trainer._metrics["train"]
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, metrics["entropy"][-1], metrics["mean_token_accuracy"][-1], list(head_rows)

    ours = loss_gradients_and_metrics(type(trainer).compute_loss)
    trls = loss_gradients_and_metrics(SFTTrainer.compute_loss)
    assert ours[0] == pytest.approx(trls[0], rel=1e-5)
    assert ours[1].keys() == trls[1].keys() and len(ours[1]) > 10
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, trls[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2] == pytest.approx(trls[2], rel=1e-5) and ours[3] == pytest.approx(trls[3])
    labels = batch["labels"]
    first_target = int(torch.nonzero((labels[:, 1:] != -100).any(0))[0])
    assert first_target > 0  # the prompts are not projected
    assert ours[4] == [labels.shape[0] * (labels.shape[1] - first_target)]
    assert trls[4] == []  # TRL's head multiplies by the weight itself

    monkeypatch.setattr(completion_loss, "MAX_LOGITS_BYTES", 0)
    bounded = loss_gradients_and_metrics(type(trainer).compute_loss)
    assert bounded[4] == [] and bounded[0] == pytest.approx(trls[0], rel=1e-6)


def test_a_completion_cut_by_max_length_gets_no_end_token_and_the_profile_is_recorded(
    tmp_path, tiny_model_dir, prepared, monkeypatch
):
    """TRL appends an end token to a completion that does not end with one: a trace cut by
    max_length must not teach the model to stop in the middle of a thought."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    seen = []
    original_train = SFTTrainer.train

    def train_recording_dataset(self, *args, **kwargs):
        seen.extend(self.train_dataset.to_list())
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", train_recording_dataset)
    max_length = 40
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared, max_length=max_length, max_steps=1)
    train_main([str(recipe)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = [row for row in seen if len(row["input_ids"]) == max_length]
    assert cut, "want rows longer than max_length"
    for row in cut:
        assert row["input_ids"][-1] != end_id and end_id not in row["input_ids"][-3:]
        assert row["labels"][-1] == row["input_ids"][-1]  # still trained, up to where it was cut
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved["reasoning_profile"] == "s1"


def test_a_prepared_dir_trains_and_records_the_delimiters_it_was_prepared_with(tmp_path, tiny_model_dir):
    """Data prepared with <think> tags trained a model that recorded s1 (its template's profile):
    budget forcing then used delimiters it never saw. A custom pair is kept whole, and a
    --reasoning_format other than the data's is refused before any training."""
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(4))
    for given, recorded in (("think-tags", "think"), ("<reasoning>,</reasoning>", "<reasoning>,</reasoning>")):
        data = tmp_path / f"data-{recorded[:5].strip('<')}"
        prepare(str(source), str(tiny_model_dir), data, reasoning_format=given)
        assert json.loads((data / "prepare_report.json").read_text())["reasoning_format"] == recorded
        recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, data, max_steps=1, max_length=64)
        train_main([str(recipe)])
        assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["reasoning_profile"] == recorded
    result = CliRunner().invoke(app, ["train", str(recipe), "--reasoning_format", "s1"])
    assert result.exit_code == 2 and "not the '<reasoning>,</reasoning>' delimiters" in " ".join(result.output.split())


def test_resume_from_checkpoint_and_the_split_are_checked_before_anything_loads(tmp_path, tiny_model_dir, prepared):
    """A missing checkpoint, true with none to resume, or a split the prepared directory lacks were
    tracebacks after the model had loaded, and QLoRA's load_in_4bit / 8bit were ignored (the full
    model trained); false starts afresh beside a checkpoint."""
    from t0s1.training.sft import checkpoint_to_resume

    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared, max_steps=1)
    for flags, words in ((["--resume_from_checkpoint", str(tmp_path / "nowhere")], "not a complete checkpoint directory"),
                         (["--resume_from_checkpoint", "true"], "holds no complete checkpoint-N"),
                         (["--dataset_train_split", "test"], "has no split 'test'"),
                         (["--load_in_4bit", "true"], "load_in_4bit trains LoRA adapters on quantized weights"),
                         (["--load_in_8bit", "true", "--use_peft", "true"], "load_in_8bit needs a CUDA GPU")):
        result = CliRunner().invoke(app, ["train", str(recipe), *flags])
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    done = tmp_path / "out" / "checkpoint-3"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text("{}")
    out = str(tmp_path / "out")
    assert checkpoint_to_resume(None, out) == checkpoint_to_resume("true", out) == checkpoint_to_resume(str(done), out) == str(done)
    assert checkpoint_to_resume("false", out) is None and checkpoint_to_resume("None", out) is None


def test_on_overflow_drop_drops_long_examples_of_every_kind_of_dataset(tmp_path, tiny_model_dir, prepared, monkeypatch):
    """on_overflow drop applied to raw datasets only: a prompt/completion file or a prepared
    directory trained its long examples truncated, while the log said nothing was dropped."""
    from trl import SFTTrainer

    sizes = []
    original_train = SFTTrainer.train

    def train_recording_size(self, *args, **kwargs):
        sizes.append(len(self.train_dataset))
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", train_recording_size)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: 1+1?\n", "completion": "2"},
                                                   {"prompt": "Q: long?\n", "completion": " word" * 200}])
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from t0s1.data.prepare import token_lengths

    lengths = sorted(token_lengths(load_from_disk(str(prepared))["train"].to_list(), AutoTokenizer.from_pretrained(tiny_model_dir)))
    for data, total, max_length in ((pairs, 2, 48), (prepared, 8, lengths[3])):
        recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, data, max_steps=1, max_length=max_length, on_overflow="drop")
        train_main([str(recipe)])
        assert 0 < sizes[-1] < total
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, pairs, max_steps=1, max_length=48)
    train_main([str(recipe)])  # truncate, the default: every example is trained
    assert sizes[-1] == 2


def test_cli_overrides_recipe_keys_and_rejects_unknown_ones(tmp_path, tiny_model_dir, prepared):
    from t0s1.training.config import parse_args

    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared, learning_rate=0.5)
    script_args, training_args, model_args, ours = parse_args(
        [str(recipe), "--learning_rate", "2e-4", "--use_peft", "true", "--lora_target_modules", "all-linear",
         "--merge_lora", "true", "--effective_batch_size", "8"]
    )
    assert training_args.learning_rate == 2e-4 and training_args.max_steps == 4
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert ours.merge_lora and ours.effective_batch_size == 8
    assert script_args.dataset_name == str(prepared)
    assert not training_args.bf16 or __import__("torch").cuda.is_available()  # float32 on a CPU

    result = CliRunner().invoke(app, ["train", str(recipe), "--no_such_key", "1"])
    assert result.exit_code == 2 and "no_such_key" in result.output
    (tmp_path / "bad.yaml").write_text("model_name_or_path: x\ndataset_name: y\nlearning_rat: 1\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "learning_rat" in result.output


def test_lora_adapter_or_merged_weights(tmp_path, tiny_model_dir, prepared):
    from transformers import AutoModelForCausalLM, pipeline

    from t0s1 import load_model

    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear",
            "--max_steps", "2"]
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    train_main([str(recipe), *lora, "--output_dir", str(adapter_dir)])
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    assert not (adapter_dir / "model.safetensors").exists()
    assert load_model(str(adapter_dir), device="cpu").tokenizer.chat_template  # base + adapter, with the template

    train_main([str(recipe), *lora, "--output_dir", str(merged_dir), "--merge_lora", "true"])
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (2, [2]) or 2 in generation["eos_token_id"]  # <|im_end|>
    out = pipeline("text-generation", model=str(merged_dir))([{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    card = (merged_dir / "README.md").read_text()
    assert "## Training Details" in card and "LoRA (merged into the weights)" in card


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, **kwargs)


def test_two_process_cpu_ddp_training_runs_to_the_end(tmp_path, tiny_model_dir, prepared):
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prepared, max_steps=3, per_device_train_batch_size=1)
    out = tmp_path / "ddp"
    result = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "t0s1.training", str(recipe), "--output_dir", str(out), "--ddp_backend", "gloo",
         "--effective_batch_size", "4"],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "2 process(es), effective batch 4" in log  # 1 per device x 2 processes x 2 accumulation steps
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size > 0 and (out / "README.md").exists() and (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_sigkill_mid_training_then_the_same_command_resumes_from_the_last_checkpoint(tmp_path, tiny_model_dir, prepared):
    recipe = tiny_recipe(
        tmp_path / "recipe.yaml", tiny_model_dir, prepared, max_steps=60, save_strategy="steps", save_steps=5,
        per_device_train_batch_size=1, disable_tqdm=True,  # no progress bar: one printed dict per logged step
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "t0s1.training", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-10" / "trainer_state.json").exists():
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-10 after 240 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # it really died mid-training
    resumed_from = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert 10 <= resumed_from < 60

    result = _run(command, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Resuming from checkpoint {out / f'checkpoint-{resumed_from}'}" in log
    logged_steps = len(re.findall(r"\{'loss': ", log))
    assert logged_steps == 60 - resumed_from  # it trained only the remaining steps, not from step 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 60
    assert (out / "model.safetensors").exists()


def _card_snippets(card: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return [b for b in blocks if "pipeline(" in b] + [b for b in blocks if "AutoModelForCausalLM" in b]


@pytest.mark.slow
def test_quickstart_recipe_on_the_embedded_model_halves_the_loss_and_the_card_snippets_run(tmp_path, smollm2):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(8))
    data = tmp_path / "data"
    prepare(str(source), "smollm2-135m-instruct", data, block_size=256)
    out = tmp_path / "quickstart-model"
    result = CliRunner().invoke(
        app,
        ["train", "quickstart", "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "30",
         "--logging_steps", "1", "--save_strategy", "no", "--max_length", "256",
         "--per_device_train_batch_size", "1"],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"quickstart loss, mean of the first 3 steps {first:.3f} -> last 3 steps {last:.3f}")
    assert last <= 0.5 * first, f"loss {first:.3f} -> {last:.3f}"

    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"datasets", "library_name", "license", "tags"} <= set(metadata)
    for section in ("## Model Details", "## Uses", "## Limitations", "## How to Get Started", "## Training Details",
                    "## Citation", "2501.19393", "Final training loss"):
        assert section in card
    snippets = _card_snippets(card)
    assert len(snippets) == 2
    model_id = re.search(r'model="([^"]+)"', snippets[0]).group(1)
    for snippet in snippets:
        printed = StringIO()
        with redirect_stdout(printed):
            exec(snippet.replace(model_id, str(out)), {})  # noqa: S102 - the card's own code, path swapped
        assert printed.getvalue().strip()
