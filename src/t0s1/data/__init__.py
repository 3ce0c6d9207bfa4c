"""`t0s1 prepare`: s1K-style reasoning traces -> a prompt/completion SFT dataset.

- ``sources``: read hub datasets, saved datasets, JSONL and Parquet files into traces.
- ``decontaminate``: drop training questions that share an 8-gram with a benchmark question.
- ``prepare``: render traces with the model's chat template and reasoning delimiters, apply the
  block size, write the dataset and its report atomically.
"""

from t0s1.data.prepare import (
    PREPARE_REPORT,
    PrepareReport,
    is_prepared_dir,
    prepare,
    render_traces,
)
from t0s1.data.sources import Trace, load_traces

__all__ = [
    "PREPARE_REPORT",
    "PrepareReport",
    "Trace",
    "is_prepared_dir",
    "load_traces",
    "prepare",
    "render_traces",
]
