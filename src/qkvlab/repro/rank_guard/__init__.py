"""`repro rank-guard`: one adaptive run against a weight-decay sweep (claim.py), and its tables and figures (render.py)."""
