"""bench/e2e_bench.py by concern: common (constants, models), timing, providers, workloads, report."""
