"""Paper 001, fine-tuning attention with η_V = λ·η_QK: `repro finetune`, the pilot grid (claim.py) and the tuned study (tuned.py), and their tables and figures (render.py, render_tuned.py)."""
