"""Applications built on fastopt: the demo and the benchmark behind ``python -m fastopt``.

Not imported by ``import fastopt``; each module registers its subcommand with the CLI.
"""
