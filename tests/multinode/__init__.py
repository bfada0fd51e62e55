"""Multi-node tests: network-namespace nodes and fake multi-node engines."""
