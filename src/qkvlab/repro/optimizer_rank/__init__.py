"""`repro optimizer-rank`: what each optimiser does to attention rank (claim.py), and its tables and figures (render.py)."""
