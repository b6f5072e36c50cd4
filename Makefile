.PHONY: bench bench-quick bench-compare

# Load benchmark, run by hand (not part of the tests); see bench/README.md.
# Extra options: make bench ARGS="--only emergency --store redis"
bench:
	python bench/run_load.py $(ARGS)

bench-quick:
	python bench/run_load.py --quick $(ARGS)

# The edge and Kamailio 5.6 (bench/reference/kamailio.cfg) measured alternately in one
# session, ending with edge / Kamailio ratios. Needs kamailio and kamailio-redis-modules.
# Example: make bench-compare ARGS="--quick --max-rate 3200"
bench-compare:
	python bench/run_load.py --target both $(ARGS)
