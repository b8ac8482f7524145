"""The paper's table in one command (``scripts/benchmark.py``): every decoding mode on the evaluation halves of
summarization, code and chat, with speed, acceptance and quality side by side, peers, a roofline and a report.

One concern per file: ``tasks`` (prompts and references), ``modes`` (name → decoder), ``metrics`` (ROUGE, pass@k),
``run`` (interleaved timing), ``roofline`` (bandwidth limit), ``peers`` (other libraries), ``report`` (JSON →
markdown and plots).
"""
