"""Data layer: reading scans and tables, preprocessing, the patch store, generated data."""
