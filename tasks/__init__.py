"""Prefect task layer of ptq-pipeline: file I/O, model and data sources, one quantlib call each."""
