"""jaxspec: lossless self-speculative decoding (Draft & Verify) for LLaMA-family models in JAX.

Start at ``scripts/generate.py`` → ``decode.py`` (the decode loop) → ``model.py`` (the transformer);
``speculative.py`` holds the draft-verify cycle.
"""

__version__ = "0.1.0"
