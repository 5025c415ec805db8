"""Launch tools for large runs: stage recipes, preflight checks, the memory/throughput planner, the dry run."""
