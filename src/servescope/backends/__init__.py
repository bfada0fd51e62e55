"""One small module per backend: its config, command line and log patterns."""
