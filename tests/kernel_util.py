"""The C++ kernels as the tests that need them get them."""
from __future__ import annotations

import shutil
from typing import Callable

import pytest


def built_kernel(fn: Callable | None, name: str) -> Callable:
    """A C++ kernel from radixserve.kernels, for a test that needs it: a failure where the toolchain is
    here (the kernel should have built), a skip where it is not."""
    if fn is None:
        if shutil.which("c++") and shutil.which("ninja"):
            pytest.fail(f"a C++ compiler and ninja are here, yet the {name} kernel did not build")
        pytest.skip(f"no C++ toolchain to build the {name} kernel")
    return fn
