"""kda-ops: compiler-native kernels for the Kimi Linear architecture.

Importing registers the `kda` torch.library ops and does nothing else.
"""

from .chunk_kda import chunk_kda
from .kda_decode import causal_conv1d, causal_conv1d_update, kda_decode
from .mla_decode import mla_cache_write, mla_decode
from .config import KimiLinearConfig
from .model import KimiLinearForCausalLM
from .export import export_model, load_exported

__all__ = ["causal_conv1d", "causal_conv1d_update", "kda_decode", "chunk_kda", "mla_decode", "mla_cache_write", "KimiLinearConfig", "KimiLinearForCausalLM", "export_model", "load_exported"]
