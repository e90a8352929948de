"""pimjax: variability-aware training, Monte-Carlo evaluation and self-tuning of
highly quantized DNNs for analog processing-in-memory, in JAX/Flax.

Importing pimjax changes no process-wide state; scripts call :func:`pimjax.runtime.configure`.
"""

__version__ = "0.1.0"
