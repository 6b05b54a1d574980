"""dpo_jax: Direct Preference Optimization and its family of losses in pure JAX."""

__version__ = "0.1.0"
