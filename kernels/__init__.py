"""kda_ops.kernels: the Triton kernels of the kda ops and their launchers. Imports torch and triton only."""
