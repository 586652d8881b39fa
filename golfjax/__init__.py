"""golfjax: the Parameter Golf training stack in JAX/Flax."""

__version__ = "0.1.0"
