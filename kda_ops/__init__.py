"""kda-ops: compiler-native kernels for the Kimi Linear architecture.

Importing registers the `kda` torch.library ops and does nothing else.
"""

from .chunk_kda import chunk_kda
from .mla_decode import mla_decode

__all__ = ["chunk_kda", "mla_decode"]
