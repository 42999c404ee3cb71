"""The model zoo (installed as ``pvae.models``)."""
