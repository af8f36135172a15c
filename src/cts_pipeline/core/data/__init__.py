"""Datasets: the registry, in-memory splits, streamed image folders, batch transforms and someone's own data."""
