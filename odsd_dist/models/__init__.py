"""The model zoo: every model exposes `forward` (logits), `forward_features` (penultimate f), `classify(f)`
and `feature_dim`; weights travel as safetensors with their metadata (models/io.py)."""
from .base import ZooModel
from .inference import inference_forward
from .io import load_model, normalize, read_model_meta, save_model, weights_sha256
from .registry import ARCHS, build_model

__all__ = ["ARCHS", "ZooModel", "build_model", "inference_forward", "load_model", "normalize", "read_model_meta", "save_model",
           "weights_sha256"]
