"""Benchmarks of vfiouser_trio, reported as ratios against baselines measured in the same run."""
