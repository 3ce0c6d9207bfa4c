"""``python -m t0s1.training RECIPE.yaml [--key value ...]``: what ``accelerate launch -m`` runs."""

from t0s1.training.sft import main_guarded

if __name__ == "__main__":
    main_guarded()
