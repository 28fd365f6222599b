"""Multi-head attention for NumPy, CuPy and every Array API library, with TabPFN's semantics."""

from ._budget import get_memory_budget, set_memory_budget
from ._backends import BackendUnavailableError
from .attention import merge_attention, scaled_dot_product_attention, scaled_dot_product_attention_vjp
from .comparison import Comparison, compare
from .module import MultiHeadAttention
from .views import broadcast_kv_across_heads
from .weights import convert_torch_nn_multihead_attention_state_dict
from . import testing as testing  # so that `import mha_cupy` is enough for mha_cupy.testing

__version__ = "0.2.0"

__all__ = [
    "BackendUnavailableError",
    "Comparison",
    "compare",
    "MultiHeadAttention",
    "convert_torch_nn_multihead_attention_state_dict",
    "broadcast_kv_across_heads",
    "get_memory_budget",
    "merge_attention",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_vjp",
    "set_memory_budget",
]
