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


# The slowest files, with their seconds on a 2-core machine (Zen 4, 2026-12-02): run first, so
# that under `-n 2 --dist loadfile` the small files fill the end of both workers' queues
# instead of one worker finishing a long file alone. The order changes nothing else.
_SLOW_FILES = {
    "test_benchmarks.py": 100,
    "test_gpu_check.py": 100,
    "test_moe.py": 55,
    "test_hf.py": 50,
    "test_tensor_parallel.py": 45,
    "test_cpu_kernels.py": 45,
    "test_cli.py": 35,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -_SLOW_FILES.get(item.path.name, 0))  # stable: each file keeps its order
