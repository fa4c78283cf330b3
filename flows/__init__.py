"""Prefect flows of ptq-pipeline: one per DVC stage, plus the parameter and stage definitions.

`flows.params` parses params.yaml once into frozen, validated configs; `flows.stages` is the single
description of the DVC graph, from which dvc.yaml is generated.
"""
