"""Tests against a real vLLM (its CPU build) serving tiny random models: ``nox -s vllm``."""
