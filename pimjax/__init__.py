"""pimjax: variability-aware training, Monte-Carlo evaluation and self-tuning of
highly quantized DNNs for analog processing-in-memory, in JAX/Flax."""

from pimjax._xla_flags import apply_cpu_defaults

apply_cpu_defaults()

__version__ = "0.1.0"
