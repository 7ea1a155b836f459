"""GPU validation: checks that training on this machine computes what it should."""
