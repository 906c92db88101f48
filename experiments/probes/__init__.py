"""What ``experiments/cpu_probes.py`` runs: single operations, our real steps, numerics."""
