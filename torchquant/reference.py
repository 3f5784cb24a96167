"""Plain-PyTorch definitions of every torchquant op: the readable specification and the test oracle.

Nothing here is fast; everything here is meant to be obviously right. The compiled kernels must match these
functions bit for bit on integers (and up to float summation order on float outputs of matrix products).
"""
import torch

# ---------------------------------------------------------------------------------------------------------------
# Quantize family
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Integer matrix family
# ---------------------------------------------------------------------------------------------------------------
