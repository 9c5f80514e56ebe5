"""nan-peft: merge LoRA adapters with training-free NAN coefficients (arXiv 2505.16148).

    import nan_peft
    result = nan_peft.merge_adapters(["math", "code"], combine="svd", rank=16)
    result.save_pretrained("merged")
"""

from .coefficients import Coefficients, coefficients_for, manual_coefficients, nan_coefficients, uniform_coefficients
from .combination import ModuleReport, combine
from .errors import NanPeftError
from .lora import LoraAdapter, LoraModule
from .merge import MergeResult, merge_adapters
from .norms import UpdateGram, update_gram
from .reader import read_adapter, read_adapters
from .writer import adapter_config, adapter_state_dict, write_adapter

__version__ = "0.1.0"

__all__ = [
    "Coefficients",
    "LoraAdapter",
    "LoraModule",
    "MergeResult",
    "ModuleReport",
    "NanPeftError",
    "UpdateGram",
    "adapter_config",
    "add_nan_weighted_adapter",
    "add_weighted_adapter",
    "adapter_state_dict",
    "coefficients_for",
    "combine",
    "manual_coefficients",
    "merge_adapters",
    "nan_coefficients",
    "read_adapter",
    "read_adapters",
    "uniform_coefficients",
    "update_gram",
    "write_adapter",
]


def __getattr__(name: str):
    # add_nan_weighted_adapter and add_weighted_adapter need peft's model classes (and so transformers): import
    # them on first use
    if name == "add_nan_weighted_adapter":
        from .live import add_nan_weighted_adapter

        return add_nan_weighted_adapter
    if name == "add_weighted_adapter":
        from .weighted_adapter import add_weighted_adapter

        return add_weighted_adapter
    raise AttributeError(f"module 'nan_peft' has no attribute {name!r}")
