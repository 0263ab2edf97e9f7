"""Model-side code: checkpoint loading and the Flax Llama."""
