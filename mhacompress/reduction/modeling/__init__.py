"""The modelling code of reduced models, split by job: the architecture table (architectures.py), the module with
its reference forward (attention.py), the fast paths (kernels.py) and the entry points that install it and that
``auto_map`` names (modeling_mhacompress.py). Those four files are copied into every saved folder (relative imports
only, so they load as remote code without mhacompress); this ``__init__`` is the package's view of them."""

from .architectures import (
                            ARCHITECTURES,
                            COMPRESSION_KEY,
                            FORMAT_VERSION,
                            REDUCED_TYPE_PREFIX,
                            Arch,
                            UnsupportedModelError,
                            arch_for,
                            attention_modules,
                            base_model_type,
                            is_classifier,
                            layers,
                            max_tokens,
)
from .attention import LAYOUTS, CollaborativeSelfAttention
from .modeling_mhacompress import (
                            METHOD_LAYOUTS,
                            REMOTE_CODE_FILES,
                            collaborate_,
                            collaborative_config_class,
                            collaborative_model_class,
                            collaborative_module,
                            first_token_only_,
                            layout_of,
                            promote_,
                            write_remote_code,
)

__all__ = [
    "ARCHITECTURES", "COMPRESSION_KEY", "FORMAT_VERSION", "LAYOUTS", "METHOD_LAYOUTS", "REDUCED_TYPE_PREFIX",
    "REMOTE_CODE_FILES", "Arch", "CollaborativeSelfAttention", "UnsupportedModelError", "arch_for",
    "attention_modules", "base_model_type", "collaborate_", "collaborative_config_class", "collaborative_model_class",
    "collaborative_module", "first_token_only_", "is_classifier", "layers", "layout_of", "max_tokens", "promote_",
    "write_remote_code",
]
