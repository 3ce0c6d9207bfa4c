"""The shipped recipes and accelerate configs: parsed by TRL's own parser, with the s1 recipe's values."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from t0s1.training.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SIZES = ("1.5B", "3B", "7B", "14B", "32B")


def test_root_folders_are_links_to_the_package_data():
    assert (ROOT / "recipes").is_symlink() and (ROOT / "configs").is_symlink()
    assert (ROOT / "recipes").resolve() == (ROOT / "src" / "t0s1" / "recipes").resolve()


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_key_is_known_to_the_parser_and_none_is_deprecated(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        parse_args([str(RECIPES / recipe)])  # unknown keys raise, deprecated ones warn


def test_the_old_checkpointing_key_is_named_only_when_a_recipe_writes_it(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("model_name_or_path: m\ndataset_name: d\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # TRL's own default of the old key: nothing to say
        assert parse_args([str(plain)])[1].activation_checkpointing
    old = tmp_path / "old.yaml"
    old.write_text("model_name_or_path: m\ndataset_name: d\ngradient_checkpointing: false\n")
    with pytest.warns(FutureWarning, match="rename the key in the recipe"):
        assert not parse_args([str(old)])[1].activation_checkpointing


@pytest.mark.parametrize("size", SIZES)
def test_t0_s1_recipes_follow_s1(size):
    script_args, args, model_args, ours = parse_args([str(RECIPES / f"t0-s1-{size}.yaml")])
    assert model_args.model_name_or_path == f"Qwen/Qwen2.5-{size}-Instruct"
    assert script_args.dataset_name == "simplescaling/s1K"
    assert args.learning_rate == 1e-5 and args.num_train_epochs == 5
    assert args.warmup_steps == 0.05 and args.lr_scheduler_type.value == "cosine"
    assert args.weight_decay == 1e-4 and (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.max_length == 32768 and args.per_device_train_batch_size == 1
    assert ours.effective_batch_size == 16 and args.activation_checkpointing
    assert model_args.dtype == "bfloat16" and not model_args.use_peft


def test_recipe_asks_bf16_but_a_cpu_trains_in_float32():
    recipe = yaml.safe_load((RECIPES / "t0-s1-3B.yaml").read_text())
    assert recipe["bf16"] is True
    _, args, _, _ = parse_args([str(RECIPES / "t0-s1-3B.yaml")])
    import torch

    if not torch.cuda.is_available():
        assert not args.bf16 and not args.fp16


def test_lora_variant():
    _, args, model_args, ours = parse_args([str(RECIPES / "t0-s1-3B-lora.yaml")])
    assert model_args.use_peft and model_args.lora_r == 16 and model_args.lora_alpha == 32
    assert model_args.lora_dropout == 0.05 and model_args.lora_target_modules == "all-linear"
    assert ours.merge_lora


def test_quickstart_is_the_embedded_model_with_lora_on_a_cpu():
    _, args, model_args, ours = parse_args(["quickstart"])  # a shipped recipe by name
    assert model_args.model_name_or_path == "smollm2-135m-instruct"
    assert model_args.use_peft and ours.merge_lora and args.max_length <= 1024
    assert args.max_steps * args.per_device_train_batch_size >= 200  # examples seen: enough to learn the task
    assert 1e-4 <= args.learning_rate <= 5e-3 and args.save_steps <= 50


def test_accelerate_configs():
    fsdp = yaml.safe_load((ROOT / "configs" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_reshard_after_forward"] == "FULL_SHARD"
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    zero3 = yaml.safe_load((ROOT / "configs" / "zero3.yaml").read_text())
    assert zero3["distributed_type"] == "DEEPSPEED" and zero3["deepspeed_config"]["zero_stage"] == 3


def test_fsdp_config_loads_in_accelerate_and_wraps_the_decoder_layer(tmp_path, tiny_model_dir):
    """accelerate reads the config, and its auto-wrap policy picks the model's decoder layer."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    config = load_config_from_file(str(ROOT / "configs" / "fsdp.yaml"))
    assert config.distributed_type.value == "FSDP"
    fsdp = config.fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plugin.set_auto_wrap_policy(model)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in wrapped} == {"LlamaDecoderLayer"}
