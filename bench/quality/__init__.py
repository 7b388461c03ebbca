"""The quality benchmark (issue 9): does ODSD earn its place? See bench/quality.py and docs/RESULTS.md.

Modules: config (the benchmark config), rows (the registry of compared methods), splits (the
validation split cut from the original training split), runner (drives the odsd stages), report
(Markdown, JSON, plots), cli (the command line).
"""
