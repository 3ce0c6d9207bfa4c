"""The model card (README.md) of a trained model, shaped like the t0-s1-3B card."""

from __future__ import annotations

import json
from pathlib import Path

from t0s1.models import EMBEDDED_BASE_ID, EMBEDDED_MODEL

TAGS = ["t0s1", "s1", "reasoning", "budget-forcing", "test-time-scaling", "trl", "sft"]
KNOWN_LICENSES = {"Qwen/Qwen2.5-3B-Instruct": "other", "Qwen/Qwen2.5-72B-Instruct": "other"}
EXAMPLE_QUESTION = "How many r are in the word raspberry?"

S1_CITATION = """@misc{muennighoff2025s1simpletesttimescaling,
  title={s1: Simple test-time scaling},
  author={Niklas Muennighoff and Zitong Yang and Weijia Shi and Xiang Lisa Li and Li Fei-Fei and Hannaneh Hajishirzi and Luke Zettlemoyer and Percy Liang and Emmanuel Candès and Tatsunori Hashimoto},
  year={2025},
  eprint={2501.19393},
  archivePrefix={arXiv},
  primaryClass={cs.CL},
  url={https://arxiv.org/abs/2501.19393}
}"""

T0_CITATION = """@misc{chan2025t0,
  title={Retrieval-Augmented Reasoning with Lean Language Models},
  author={Ryan Sze-Yin Chan and Federico Nanni and Tomas Lazauskas and Rosie Wood and Penelope Yong and Lionel Tarassenko and Mark Girolami and James Geddes and Andrew Duncan},
  year={2025},
  eprint={2508.11386},
  archivePrefix={arXiv},
  primaryClass={cs.CL},
  url={https://arxiv.org/abs/2508.11386}
}"""


def final_loss(log_history: list[dict]) -> float | None:
    """The last logged training loss (not the run's average ``train_loss``)."""
    for entry in reversed(log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    dataset: str,
    data_info: dict,
    training_args,
    model_args,
    ours,
    merged: bool,
    log_history: list[dict],
    metrics: dict,
    profile,
    license: str | None = None,
) -> Path:
    base_id = EMBEDDED_BASE_ID if base_model == EMBEDDED_MODEL else base_model
    if Path(base_id).exists():  # a local directory: name the model it was made from, if recorded
        config = Path(base_id) / "config.json"
        recorded = json.loads(config.read_text()).get("_name_or_path") if config.exists() else None
        base_id = recorded if recorded and not Path(recorded).exists() else Path(base_id).name
    model_id = training_args.hub_model_id or training_args.output_dir
    name = Path(str(model_id)).name
    dataset_id = data_info.get("source") or dataset
    if Path(dataset_id).exists():  # a local file or directory: the hub metadata gets its name only
        dataset_id = Path(dataset_id).name
    license = license or KNOWN_LICENSES.get(base_id, "apache-2.0")
    loss = final_loss(log_history)
    first = next((float(e["loss"]) for e in log_history if "loss" in e), None)
    lora = model_args.use_peft
    effective = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    optimizer = getattr(training_args.optim, "value", training_args.optim)
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "float32"
    rows = [
        ("method", "LoRA" + (" (merged into the weights)" if merged else " adapter") if lora else "full fine-tuning"),
        ("learning rate", training_args.learning_rate),
        ("epochs", training_args.num_train_epochs if training_args.max_steps <= 0 else "-"),
        ("max steps", training_args.max_steps if training_args.max_steps > 0 else "-"),
        ("batch size per device", training_args.per_device_train_batch_size),
        ("gradient accumulation steps", training_args.gradient_accumulation_steps),
        ("processes", training_args.world_size),
        ("effective batch size", effective),
        ("lr schedule", f"{scheduler}, warmup {training_args.warmup_steps} (below 1: a share of the steps)"),
        ("optimizer", f"{optimizer}, betas ({training_args.adam_beta1}, {training_args.adam_beta2}), "
         f"weight decay {training_args.weight_decay}"),
        ("precision", precision),
        ("block size (max_length)", training_args.max_length),
        ("activation checkpointing", bool(training_args.activation_checkpointing)),
        ("loss", "completion only (prompt tokens labelled -100)"),
    ]
    if lora:
        targets = model_args.lora_target_modules
        rows.append(("LoRA", f"r {model_args.lora_r}, alpha {model_args.lora_alpha}, "
                     f"dropout {model_args.lora_dropout}, targets {targets}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    block = data_info.get("block_size")
    truncation = ""
    if block and data_info.get("over_block_size") is not None:
        truncation = (
            f" {data_info['over_block_size']} of them were longer than the block size of {block} tokens "
            f"({data_info.get('truncated', 0)} truncated, {data_info.get('dropped_over_block_size', 0)} dropped)."
        )
    decontamination = data_info.get("decontamination") or {}
    if decontamination.get("benchmarks"):
        truncation += (
            f" Decontaminated against {', '.join(decontamination['benchmarks'])} (8-gram overlap): "
            f"{len(decontamination['dropped'])} questions dropped."
        )
    lengths = data_info.get("token_lengths") or {}
    length_line = (
        f" Tokens per example: median {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']}." if lengths else ""
    )
    loss_line = f"{loss:.4f}" if loss is not None else "not logged"
    if first is not None and loss is not None:
        loss_line += f" (first logged: {first:.4f})"
    adapter_note = (
        ""
        if merged
        else "\nThis directory holds a LoRA adapter: `peft` must be installed, and the base model is loaded from "
        f"`{base_id}`.\n"
    )
    metadata = {
        "base_model": base_id,
        "datasets": [dataset_id],
        "library_name": "peft" if not merged else "transformers",
        "license": license,
        "pipeline_tag": "text-generation",
        "tags": TAGS + (["lora"] if lora else []),
    }
    text = f"""---
{_yaml(metadata)}---

# {name}

{name} is {base_id} fine-tuned with supervised fine-tuning (TRL SFTTrainer) on reasoning traces from
`{dataset_id}`, with the loss on the assistant part only, following "s1: Simple test-time scaling"
as t0-s1-3B did. Made with t0-s1 (`t0s1 train`).

## Model Details

- **Model type:** causal language model (text generation)
- **Finetuned from model:** {base_id}
- **Language(s):** English
- **License:** {license}
- **Reasoning format:** the assistant thinks between `{profile.thinking_start}` and
  `{profile.thinking_end}`, then answers ("Answer: ..."); t0s1 profile `{profile.name}`, recorded as
  `reasoning_profile` in `tokenizer_config.json`.
{adapter_note}
## Uses

### Direct Use

Reasoning and question answering, with test-time scaling by budget forcing: cap the thinking
(`max_thinking_tokens`) or extend it by replacing the end of thinking with "Wait" (`num_ignore`).
It is meant for exploring test-time scaling on small models, as in the s1 paper and the t0 report.

### Out-of-Scope Use

Medical, legal or financial decisions without expert review; languages other than English;
production use without further evaluation and safety review.

## Limitations

The model inherits the biases and errors of {base_id} and of its training traces. The training set
is small and made of competition-style problems, so behaviour on other tasks may differ. The t0
report found that s1-style SFT helps AIME only from about 14B parameters up and can hurt small models;
traces longer than the block size are cut, which matters most for small models. Check the thinking
and the answer before relying on them.

## How to Get Started with the Model

Use a pipeline as a high-level helper:

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{model_id}")
messages = [{{"role": "user", "content": "{EXAMPLE_QUESTION}"}}]
output = generator(messages, max_new_tokens=512)
print(output[0]["generated_text"][-1]["content"])
```

Load the model directly:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{model_id}")
model = AutoModelForCausalLM.from_pretrained("{model_id}", dtype="auto")
messages = [{{"role": "user", "content": "{EXAMPLE_QUESTION}"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
outputs = model.generate(**inputs, max_new_tokens=512)
print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[-1]:]))
```

With budget forcing (t0-s1): `t0s1.load_model("{model_id}")`, then `t0s1.generate` with
`t0s1.BudgetForcing(max_thinking_tokens=..., num_ignore=...)`. Serving: `vllm serve {model_id}`.

## Training Details

### Training Data

`{dataset_id}`: {data_info.get("rows_out", "?")} examples used ({data_info.get("rows_in", "?")} read, schema
{data_info.get("schema", "prompt/completion")}), rendered with the chat template of {base_id}.{truncation}{length_line}

### Training Hyperparameters

| setting | value |
| --- | --- |
{table}

### Results

- Final training loss: {loss_line}
- Steps: {_steps(log_history)}; training time: {metrics.get("train_runtime", 0):.0f} s

## Citation

```bibtex
{S1_CITATION}

{T0_CITATION}
```
"""
    path = Path(output_dir) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def _steps(log_history: list[dict]) -> str:
    steps = [e.get("step") for e in log_history if "step" in e]
    return str(max(steps)) if steps else ""


def _yaml(metadata: dict) -> str:
    import yaml

    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
