"""What ``python -m int8fx demo|eval`` needs: loading the real models and text, and measuring them.

Kept out of ``int8fx/__init__``: nothing here is imported unless the CLI asks for it, and
the optional packages (transformers, the model and corpus packages) are imported lazily.
"""
