"""`qkvlab theory`: paper 000's theorem measured on toys: settings (no torch, for the help), the runs (claim.py), and the tables and figures (render.py)."""
