"""Explore an index (duplicates, clusters, outliers, map), a run's report, and the local web app."""
