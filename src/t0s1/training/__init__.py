"""`t0s1 train`: TRL SFT with the s1 recipe (completion-only loss), on a CPU or many GPUs.

``python -m t0s1.training RECIPE.yaml [--key value ...]`` is the same command for
``accelerate launch -m t0s1.training ...`` (DDP, FSDP, DeepSpeed ZeRO-3).
"""
