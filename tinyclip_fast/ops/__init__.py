"""Autograd ops over the Triton kernels, each with a PyTorch path for plain CPU tensors."""
