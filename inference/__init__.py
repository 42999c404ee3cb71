"""Inference engines (installed as ``pvae.inference``)."""
