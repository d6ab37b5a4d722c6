"""Fine-tuning chosen attention matrices of pretrained models (paper 001's strategy and its controls)."""

from qkvlab._lazy import lazy_exports

_WHERE = {
    "FINETUNE_DATA": "qkvlab.finetune.data",
    "LabelledData": "qkvlab.finetune.data",
    "load_labelled": "qkvlab.finetune.data",
    "FinetuneConfig": "qkvlab.finetune.run",
    "finetune": "qkvlab.finetune.run",
    "load_classifier": "qkvlab.finetune.run",
    "model_path": "qkvlab.finetune.run",
    "target_modules": "qkvlab.finetune.run",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
