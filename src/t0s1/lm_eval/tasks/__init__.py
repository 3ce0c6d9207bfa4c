"""The ``t0s1_*`` task configs of lm-evaluation-harness (YAML here; ``utils.py`` loads and grades)."""
