"""The build farm: a matrix of builds run as stage tasks over one shared cache, locally or on a Ray cluster."""
