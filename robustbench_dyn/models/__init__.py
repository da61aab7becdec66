"""Models: a registry of builders with per-model configs, and the one checkpoint loader.

    from robustbench_dyn.models import create_model, list_models, model_config
    model = create_model("resnet50", weights="resnet50.pth")   # eval mode, strict loading

Importing this package imports every family file, which registers its models.
"""

from robustbench_dyn.models.checkpoint import WeightsMismatch, load_state_dict, load_weights, weights_sha256
from robustbench_dyn.models.registry import (
    ModelConfig,
    PaperRow,
    Preprocessing,
    create_model,
    list_models,
    model_config,
    register_model,
)

# Family files: imported for their registrations. Add each new family here.
from robustbench_dyn.models import resnet  # noqa: E402,F401  isort: skip
from robustbench_dyn.models import ddf_resnet, rednet, binet  # noqa: E402,F401  isort: skip
from robustbench_dyn.models import dcdc, odconv  # noqa: E402,F401  isort: skip

__all__ = [
    "ModelConfig",
    "PaperRow",
    "Preprocessing",
    "WeightsMismatch",
    "create_model",
    "list_models",
    "load_state_dict",
    "load_weights",
    "model_config",
    "register_model",
    "weights_sha256",
]
