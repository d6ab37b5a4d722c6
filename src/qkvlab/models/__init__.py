"""qkvlab's own models (registered in the architecture table as the ``qkvlab`` family)."""

from qkvlab.models.transformer import GPT, ICLTransformer, ModelConfig, ViT, build_model

__all__ = ["GPT", "ICLTransformer", "ModelConfig", "ViT", "build_model"]
