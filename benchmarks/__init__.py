"""Speed benchmarks: `python -m benchmarks.<name>`; each prints its ratio as the last line."""
