"""Tasks: the user-facing jobs behind the CLI verbs that are not a single stage: run, eval, bench (and its
profile), inspect, the demo and training of the shipped fixture.

May import: any stage package and the top-level helpers. Only ``toolkit.cli`` imports tasks.
"""
