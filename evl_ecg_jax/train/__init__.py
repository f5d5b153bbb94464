"""Training: state, optimiser, the per-device step and the loop."""
