"""A pod's network namespace for local processes (see `sitecustomize.py`; `serving.py` puts this directory first on
the PYTHONPATH of the containers it runs)."""
