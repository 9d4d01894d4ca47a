"""Benchmarks and the paper's tables, run from the repository root as modules:

    python -m bench.decode          # where a generated image's time goes
    python -m bench.shapes_eval     # the bundled model's Shapes World table
    python -m bench.paper_table4    # (and paper_table17, paper_fig7, paper_sad_curve)

Results land in bench/results/ (the paper tables) or are printed as markdown.
"""
