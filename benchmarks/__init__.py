"""Side-by-side benchmarks: what encryption costs, and how ctfs compares.

Run ``python -m benchmarks`` (see benchmarks/README.md)."""
