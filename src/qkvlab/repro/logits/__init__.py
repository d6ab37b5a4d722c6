"""`repro logits`: whether attention weight decay holds logits down as QK-clip does (claim.py)."""
