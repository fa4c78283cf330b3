"""Triton kernel modules for tests, interpreted when there is no GPU."""
import importlib
import os

import torch


def interpreted(*names: str):
    """Generator for a module fixture: the Triton kernel modules `names` (in import order), imported
    interpreted when there is no GPU. `triton.jit` reads TRITON_INTERPRET when a kernel is decorated,
    i.e. when its module is imported, so it is set first, and a module imported earlier in the other
    mode is reloaded; the variable is restored afterwards. Yields the last module."""
    cuda = torch.cuda.is_available()
    saved = os.environ.get("TRITON_INTERPRET")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    for name in names:
        mod = importlib.import_module(name)
        if mod.INTERPRET == cuda:  # imported earlier in the other mode
            mod = importlib.reload(mod)
    yield mod
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
