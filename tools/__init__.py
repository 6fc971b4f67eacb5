"""Tools around the mounted tree: axctl (axctl/), benchmarks (bench/), example scripts (examples/)."""
