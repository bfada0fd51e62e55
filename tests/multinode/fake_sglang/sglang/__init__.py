"""A fake ``sglang`` package for multi-node tests: only ``python -m sglang.launch_server``.

Put ``tests/multinode/fake_sglang`` on ``PYTHONPATH`` (``netns.fake_sglang_env()``) to use
it; real SGLang cannot serve on a CPU-only machine. See ``launch_server.py``.
"""
