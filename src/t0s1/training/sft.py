"""``t0s1 train``: supervised fine-tuning with the s1 recipe (TRL SFTTrainer, completion-only loss).

Reads top to bottom like open-r1's sft.py: parse the recipe, load the data (a directory written by
``t0s1 prepare``, or raw s1K-style data rendered on the fly), train (resuming from the last
checkpoint in output_dir), save weights + tokenizer + generation config + model card.
Runs unchanged under ``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO-3) and on a CPU.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from t0s1.data.prepare import (
    build,
    is_prepared_dir,
    load_tokenizer,
    read_report,
    tokenize_rows,
)
from t0s1.data.sources import load_traces, read_rows
from t0s1.errors import UserError
from t0s1.models import resolve_model_source
from t0s1.profiles import detect_profile, profile_by_name, record_profile
from t0s1.training.config import parse_args


def main(argv: list[str] | None = None):
    """Train from ``[RECIPE.yaml, --key, value, ...]``; returns the trainer."""
    script_args, training_args, model_args, ours = parse_args(sys.argv[1:] if argv is None else argv)
    return train(script_args, training_args, model_args, ours)


def train(script_args, training_args, model_args, ours):
    import torch
    from datasets import Dataset
    from trl import get_peft_config

    from t0s1.training.loss import trainer_class

    # peft reads the model's is_gradient_checkpointing, deprecated by transformers 5: not ours to fix.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    log = _Log(training_args)
    checkpoint = checkpoint_to_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # before any loading
    source, gguf_file = resolve_model_source(model_args.model_name_or_path)
    quantization = quantization_for(model_args, gguf_file)
    revision = model_args.model_revision  # the tokenizer, the weights, the base a LoRA merges into, the generation config
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision)
    profile = detect_profile(tokenizer, training_reasoning_format(script_args.dataset_name, ours.reasoning_format)).profile
    record_profile(tokenizer, profile)  # saved with the tokenizer: detection is exact for this model

    dataset, data_info = load_train_dataset(
        script_args, tokenizer, profile, training_args.max_length, ours, log, model_args.model_name_or_path
    )
    # Tokenized here, not by TRL: a completion cut at max_length must not get an end token appended.
    dataset = Dataset.from_list(tokenize_rows(dataset, tokenizer, training_args.max_length))
    training_args.completion_only_loss = True
    # The completions end with the chat template's end-of-turn token; make it the eos token so TRL
    # does not append a second one and generation stops there.
    end_token = data_info["end_token"]
    if end_token and end_token != tokenizer.eos_token and end_token in tokenizer.get_vocab():
        training_args.eos_token = end_token

    if ours.effective_batch_size:
        per_step = training_args.per_device_train_batch_size * training_args.world_size
        steps = max(1, ours.effective_batch_size // per_step)
        if steps * per_step != ours.effective_batch_size:
            log(f"effective_batch_size {ours.effective_batch_size} is not a multiple of {per_step}: "
                f"using {steps * per_step}.")
        training_args.gradient_accumulation_steps = steps

    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinned memory only speeds up copies to a GPU
    # Weights in float32 on a CPU; on GPUs the recipe's dtype (bf16 for the t0-s1 recipes), but float32
    # master weights under fp16 mixed precision (its gradient scaler refuses fp16 weights).
    if not torch.cuda.is_available() or training_args.fp16:
        dtype = "float32"
    else:
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "bfloat16"
    training_args.model_init_kwargs = {
        "dtype": dtype,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        **(training_args.model_init_kwargs or {}),
    }
    model = source
    if gguf_file:  # a GGUF file cannot be loaded from a string by TRL: load it the engine's way
        from t0s1.models import load_model

        model = load_model(model_args.model_name_or_path, device="cpu", dtype=dtype, backend="transformers").model
    peft_config = get_peft_config(model_args)
    if ours.merge_lora and peft_config is None:
        log("merge_lora is set but use_peft is not: nothing to merge, the full model is saved.")

    trainer = trainer_class()(  # trl.SFTTrainer, with a loss that scores only the completion on a CPU
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization,
    )
    if not training_args.disable_tqdm:  # one rich bar (steps, loss, ETA), not tqdm's bar and a dict per log
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_progress_bar())

    output_dir = training_args.output_dir
    if checkpoint:
        log(f"Resuming from checkpoint {checkpoint}")
    effective = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    log(
        f"Training {model_args.model_name_or_path} on {len(dataset)} examples "
        f"({'LoRA r=' + str(model_args.lora_r) if peft_config else 'full fine-tuning'}, {dtype}, "
        f"{training_args.world_size} process(es), effective batch {effective})"
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    metrics["train_examples"] = len(dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    save_model(trainer, source, gguf_file, dtype, peft_config is not None and ours.merge_lora, end_token, revision)
    if trainer.is_world_process_zero():
        from t0s1.training.model_card import write_model_card

        write_model_card(
            output_dir,
            base_model=model_args.model_name_or_path,
            dataset=script_args.dataset_name,
            data_info=data_info,
            training_args=training_args,
            model_args=model_args,
            ours=ours,
            merged=peft_config is None or ours.merge_lora,
            log_history=trainer.state.log_history,
            metrics=metrics,
            profile=profile,
            license=ours.license,
        )
        log(f"Saved the model, tokenizer and model card to {output_dir}")
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def quantization_for(model_args, gguf_file: str | None):
    """bitsandbytes' config for ``load_in_4bit`` / ``load_in_8bit`` (QLoRA: LoRA adapters trained
    on quantized base weights; TRL's ``get_quantization_config``), None without them; a
    ``UserError`` where they cannot run."""
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    if config is None:
        return None
    import torch

    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not model_args.use_peft:
        raise UserError(f"{flag} trains LoRA adapters on quantized weights (QLoRA): set use_peft true.")
    if gguf_file:
        raise UserError(f"{flag} quantizes safetensors weights as they load; a GGUF file is loaded by t0s1: leave {flag} out.")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} needs a CUDA GPU (bitsandbytes); on a CPU leave it out (LoRA trains the float32 model).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} needs bitsandbytes: pip install bitsandbytes.") from None
    return config


NO_RESUME = ("false", "no", "none", "0")
LAST_CHECKPOINT = ("true", "yes", "1", "last")


def checkpoint_to_resume(given, output_dir: str) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names: unset, the newest complete one in
    ``output_dir`` if any (a killed run resumes by running the same command again); false (or
    none) to start afresh; true (or last) the newest, which must exist; else a checkpoint
    directory, which must exist. A ``UserError`` before anything is loaded otherwise."""
    if given is None:
        return last_checkpoint(output_dir)
    word = str(given).strip().lower()
    if word in NO_RESUME:
        return None
    if word in LAST_CHECKPOINT:
        found = last_checkpoint(output_dir)
        if found is None:
            raise UserError(f"resume_from_checkpoint {given}: {output_dir} holds no complete checkpoint-N to resume from; "
                            "leave it out to start afresh.")
        return found
    if not (Path(given) / "trainer_state.json").is_file():
        raise UserError(f"resume_from_checkpoint {given}: not a complete checkpoint directory (no trainer_state.json); "
                        "give a checkpoint-N folder of an earlier run, true for the newest in output_dir, or false.")
    return str(given)


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (a run killed while writing one leaves
    it without trainer_state.json, which is written last: skip it)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for entry in Path(output_dir).iterdir():
        name = entry.name
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit():
            if (entry / "trainer_state.json").is_file():
                steps.append((int(name.split("-")[-1]), str(entry)))
    return max(steps)[1] if steps else None


def training_reasoning_format(dataset_name: str, given: str | None) -> str | None:
    """The reasoning format to train with and record: a prepared directory's own (its completions
    were rendered with those delimiters), which a given one must equal; else the given one (None:
    detected from the tokenizer)."""
    if not is_prepared_dir(dataset_name):
        return given
    prepared = read_report(dataset_name).get("reasoning_format")
    if not isinstance(prepared, str) or prepared in ("", "custom"):  # a custom pair that older versions did not record
        return given
    if given and profile_by_name(given) != profile_by_name(prepared):
        raise UserError(
            f"--reasoning_format {given!r} is not the {prepared!r} delimiters {dataset_name} was prepared with: "
            f"leave --reasoning_format out, or prepare the data again with --reasoning-format {given!r}."
        )
    return prepared


def load_train_dataset(script_args, tokenizer, profile, max_length, ours, log, model_name: str = ""):
    """The prompt/completion training split and what the model card says about it."""
    from datasets import Dataset, DatasetDict, load_from_disk

    name = script_args.dataset_name
    split = script_args.dataset_train_split
    if is_prepared_dir(name):
        report = read_report(name)
        if report.get("model") != model_name:
            log(f"Note: {name} was prepared for {report.get('model')}, not {model_name}: its prompts use that "
                "model's chat template.")
        loaded = load_from_disk(name)
        if isinstance(loaded, DatasetDict) and split not in loaded:
            raise UserError(f"{name} has no split {split!r} (it has {', '.join(loaded)}): t0s1 prepare writes 'train'; "
                            "leave dataset_train_split out.")
        dataset = loaded[split] if isinstance(loaded, DatasetDict) else loaded
        info = {**report, "prepared": True}
        if max_length and report.get("block_size") != max_length:
            dataset = _fit_to_max_length(dataset, tokenizer, max_length, ours.on_overflow, info, log)
        return dataset, info
    rows, columns = read_rows(name, split, script_args.dataset_config)
    if {"prompt", "completion"} <= set(columns):  # already prompt/completion: TRL reads it as it is
        from t0s1.data.prepare import end_of_turn

        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        info = {"source": name, "rows_in": len(rows), "rows_out": len(rows), "end_token": end_of_turn(tokenizer)}
        if max_length:
            dataset = _fit_to_max_length(dataset, tokenizer, max_length, ours.on_overflow, info, log)
        return dataset, info
    # Raw s1K-style data: render it now, exactly as `t0s1 prepare` would (without decontamination).
    traces = load_traces(name, split=split, config=script_args.dataset_config)
    rendered, report = build(
        traces,
        tokenizer,
        profile,
        model_name=model_name,
        block_size=max_length,
        on_overflow=ours.on_overflow,
    )
    log(report.summary())
    return Dataset.from_list(rendered), {**report.to_dict(), "prepared": False}


def _fit_to_max_length(dataset, tokenizer, max_length: int, on_overflow: str, info: dict, log):
    """The examples longer than max_length: cut by the trainer (``truncate``: their start is kept)
    or dropped here (``drop``), as ``t0s1 prepare --on-overflow`` does; said in the log and ``info``."""
    from t0s1.data.prepare import percentiles, token_lengths

    rows = dataset.to_list()
    lengths = token_lengths(rows, tokenizer)
    over = [i for i, length in enumerate(lengths) if length > max_length]
    dropping = on_overflow == "drop"
    info.update(block_size=max_length, over_block_size=len(over), truncated=0 if dropping else len(over),
                dropped_over_block_size=len(over) if dropping else 0)
    info["token_lengths"] = percentiles(lengths)
    if not over:
        return dataset
    if not dropping:
        log(f"{len(over)} of {len(lengths)} examples are longer than max_length {max_length} tokens: the trainer "
            "truncates them (the end of their thinking and the answer are not trained).")
        return dataset
    if len(over) == len(rows):
        raise UserError(f"Every example is longer than max_length {max_length} tokens, and on_overflow is drop: "
                        "nothing is left to train. Raise max_length or use on_overflow truncate.")
    log(f"{len(over)} of {len(lengths)} examples are longer than max_length {max_length} tokens: dropped (on_overflow drop).")
    kept = dataset.select([i for i in range(len(rows)) if lengths[i] <= max_length])
    info["rows_out"] = len(kept)
    return kept


def save_model(trainer, source: str, gguf_file: str | None, dtype: str, merge: bool, end_token: str,
               revision: str | None = None) -> None:
    """Weights as safetensors (LoRA merged when asked, into ``source`` at ``revision``), tokenizer,
    and a generation config that stops at the end-of-turn token."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)  # gathers FSDP / ZeRO-3 shards; the adapter only for LoRA
    if trainer.is_world_process_zero():
        tokenizer = trainer.processing_class
        tokenizer.save_pretrained(output_dir)
        if merge:
            _merge_adapter(output_dir, source, gguf_file, dtype, revision)
        _write_generation_config(output_dir, source, tokenizer, end_token, revision)
    trainer.accelerator.wait_for_everyone()


def _merge_adapter(output_dir: str, source: str, gguf_file: str | None, dtype: str, revision: str | None = None) -> None:
    """Reload the base model and the saved adapter, merge, and replace the adapter by the merged
    weights (done from the saved files, so it works the same after FSDP or ZeRO-3 training)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from t0s1.models import clear_quantization_flags

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    base = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    if gguf_file:
        clear_quantization_flags(base)
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    for name in ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"):
        path = Path(output_dir) / name
        if path.exists():
            path.unlink()
    merged.save_pretrained(output_dir)


def _write_generation_config(output_dir: str, source: str, tokenizer, end_token: str, revision: str | None = None) -> None:
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source, **({"revision": revision} if revision else {}))
    except OSError:
        config = GenerationConfig()
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token in (end_token, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in eos:
            eos.append(token_id)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(output_dir)


def _progress_bar():
    """A trainer callback that shows a rich progress bar over the optimizer steps with the latest loss
    (the logged numbers stay in trainer_state.json and the model card)."""
    from transformers import TrainerCallback

    from t0s1.progress import ProgressBar

    class RichProgress(TrainerCallback):
        bar = ProgressBar(False, 0, "training")

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = ProgressBar(state.is_world_process_zero, state.max_steps, "training",
                                   unit="steps, loss {task.fields[loss]}", completed=state.global_step, loss="-")
            self.bar.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.update(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.__exit__(None, None, None)

    return RichProgress()


class _Log:
    """Print on the main process only."""

    def __init__(self, training_args):
        self.main = training_args.process_index == 0

    def __call__(self, message: str) -> None:
        if self.main:
            print(f"[t0s1 train] {message}", flush=True)


def main_guarded(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m t0s1.training``: a ``UserError`` is one line and exit code 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
