import os

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before
# triton is first imported, so it is set here, ahead of every test module.
os.environ.setdefault("TRITON_INTERPRET", "1")
