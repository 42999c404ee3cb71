"""pvae: probabilistic-programming VAEs on Pyro."""
