"""`make bench`: performance figures (see bench/run.py)."""
