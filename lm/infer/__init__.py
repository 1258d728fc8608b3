"""Inference: loading a run, a checkpoint or a Hugging Face folder for generation and scoring, the
decode loop with its KV cache, sampling, and scoring."""
