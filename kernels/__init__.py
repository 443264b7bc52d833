"""Kernels (installed as agentserve.kernels): one concern a file, each a Triton kernel with a torch
reference beside it. The engine calls the dispatching function; on CPU it is the torch reference.

`set_backend("torch")` forces the references everywhere (also on CUDA), `set_backend("auto")`
(the default; also `"triton"`) uses Triton for CUDA tensors. The environment variable
AGENTSERVE_KERNEL_BACKEND sets the initial value."""

if __name__ == "kernels":
    # Imported as a top-level `kernels`, not as agentserve.kernels: the repository root is on sys.path (a
    # script, `python -c` or a notebook run from the checkout), where this directory shadows Hugging Face's
    # `kernels` package, which transformers imports while loading Llama configs (a confusing "cannot import
    # name 'CUDAProperties' from 'kernels'"). Load that package in this one's place; agentserve imports this
    # directory only under its package name.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != _root])
    if _spec is None or _spec.loader is None:
        # No such package installed. transformers' availability check found this directory by name and
        # imports it to read a version; an ImportError here would escape that check and fail the model's
        # load. An empty namespace module (no __file__, no __version__) is what the check reads as
        # "shadowed on sys.path, not installed", so transformers carries on without Hugging Face kernels.
        import types

        _empty = types.ModuleType("kernels", "stands in for the absent Hugging Face `kernels` package")
        _empty.__file__ = None
        _empty.__path__ = []
        sys.modules["kernels"] = _empty
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this runs
        _spec.loader.exec_module(_module)
else:
    from ._triton_utils import HAS_TRITON, get_backend, set_backend

    __all__ = ["HAS_TRITON", "get_backend", "set_backend"]
