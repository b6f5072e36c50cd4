.PHONY: bench bench-quick

# Load benchmark, run by hand (not part of the tests); see bench/README.md.
# Extra options: make bench ARGS="--only emergency --store redis"
bench:
	python bench/run_load.py $(ARGS)

bench-quick:
	python bench/run_load.py --quick $(ARGS)
