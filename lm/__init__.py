"""nnx-lm: the library. One subpackage per job; docs/architecture.md draws the layers."""
