"""`make bench`: ratio benchmarks of authsvc and its client package, measured in one run."""
