"""Human-facing output: tables and plots. Arranges results; computes nothing new."""
