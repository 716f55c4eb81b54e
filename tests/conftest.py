"""Shared test settings: fast resync for the operator under test."""

import os

# Timer intervals are fixed when the controllers are imported: make them short for tests.
os.environ.setdefault("PERENNIAL_RESYNC_SECONDS", "1")
os.environ.setdefault("PERENNIAL_PROGRESS_SECONDS", "1")
