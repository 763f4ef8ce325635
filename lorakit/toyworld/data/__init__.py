"""Shipped toy-world weights (a package so setuptools includes the files)."""
