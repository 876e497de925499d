"""Command-line interface: one module per command group, discovered automatically (see main.py)."""
