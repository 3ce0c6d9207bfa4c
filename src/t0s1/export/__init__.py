"""``t0s1 export``: a model that ``t0s1 train`` wrote -> a GGUF file for llama.cpp, LM Studio and
Ollama (``exporter``: the steps; ``converter``: llama.cpp's converter in a private folder;
``quantize``: llama.cpp's quantizer; ``ollama``: the Modelfile)."""

from t0s1.export.exporter import GGUF_PROFILE_KEY, ExportResult, default_gguf_path, export_gguf
from t0s1.export.quantize import QUANT_TYPES

__all__ = ["GGUF_PROFILE_KEY", "QUANT_TYPES", "ExportResult", "default_gguf_path", "export_gguf"]
