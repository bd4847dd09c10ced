"""`make bench`: throughput and latency of the router against a bare client, in one run."""
