import os

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before
# triton is first imported, so it is set here, ahead of every test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the interpreter switch above)


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch and reads counters it alone incremented."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
