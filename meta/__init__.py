"""kda_ops.meta: the specification of the kda ops — input contracts, fake implementations and the
pure-PyTorch references (the CPU implementation and the test oracle). Imports torch only."""
