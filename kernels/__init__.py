"""Kernels (installed as agentserve.kernels): one concern a file, each a Triton kernel with a torch
reference beside it. The engine calls the dispatching function; on CPU it is the torch reference."""
