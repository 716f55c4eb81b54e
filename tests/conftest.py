"""Shared test settings. The operator under test gets its settings explicitly (tests/harness.py), never from the environment."""
