"""Datasets, patch sampling, transforms and the synthetic scroll generator."""
