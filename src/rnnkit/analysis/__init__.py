"""Instruments: gradient flow through time, gate statistics, activation capture, plots, HTML report."""
