"""Performance benchmarks of sbn-study; `python -m benchmarks [NAME ...] [--quick]`, results in RESULTS.md."""
