"""t0-s1: s1-style fine-tuning and budget forcing for small reasoning models."""

from t0s1.errors import ModelNotFoundError, UserError
from t0s1.forcing import BudgetForcing, Result, generate_sweep
from t0s1.generation import generate
from t0s1.models import EMBEDDED_MODEL, LoadedModel, load_model
from t0s1.profiles import ModelProfile, detect_profile

__all__ = [
    "EMBEDDED_MODEL",
    "BudgetForcing",
    "LoadedModel",
    "ModelNotFoundError",
    "ModelProfile",
    "Result",
    "UserError",
    "generate",
    "generate_sweep",
    "detect_profile",
    "load_model",
]
