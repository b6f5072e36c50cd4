.PHONY: bench bench-quick bench-compare soak attack fuzz

# The load benchmarks run the package as it ships: its hot modules compiled (scripts/compile
# builds it into build/compiled first). BUILD=src runs src/ as Python instead.
BUILD ?= compiled
ifeq ($(BUILD),src)
BENCH = PYTHONPATH=src python
PREPARE = true
else
BENCH = PYTHONPATH=build/compiled python
PREPARE = scripts/compile build/compiled
endif

# Load benchmark, run by hand (not part of the tests); see bench/README.md. The edge on the
# Redis store and on memory://, calls from 10,000 provisioned lines in mixed caller formats,
# 30 s rate steps, each best rate confirmed by a 60 s run; about 15 minutes.
# Extra options: make bench ARGS="--only emergency --store redis"
bench:
	$(PREPARE)
	$(BENCH) bench/run_load.py $(ARGS)

bench-quick:
	$(PREPARE)
	$(BENCH) bench/run_load.py --quick $(ARGS)

# The edge and Kamailio 5.6 (bench/reference/kamailio.cfg, one worker, the same Redis)
# measured alternately in one session, ending with edge / Kamailio ratios; about 25 minutes.
# Needs kamailio and kamailio-redis-modules. Example: make bench-compare ARGS="--quick"
bench-compare:
	$(PREPARE)
	$(BENCH) bench/run_load.py --target both $(ARGS)

# The edge alone for 600 s at half its confirmed 911 maximum (from the newest report in
# bench/results/, or ARGS="--soak-rate N"), its RSS read every 10 s: flat or not.
# Example: make soak ARGS="--soak-duration 60 --soak-rate 100"
soak:
	$(PREPARE)
	$(BENCH) bench/run_load.py --soak $(ARGS)

# Fault and attack bench (bench/attack.py), run by hand: floods, forged responses, relay
# attempts, half-open TCP, a 911 burst, Redis faults, a blackholed trunk, SIGTERM; about 7 min.
# Example: make attack ARGS="--only forged relay --duration 10"
attack:
	$(PREPARE)
	$(BENCH) bench/attack.py $(ARGS)

# Fuzz bench for the parser, the stream framer and the proxy core, run by hand (not in CI):
# 1,000,000 inputs by default, reproducers in fuzz-crashes/. See bench/fuzz.py and
# docs/reliability.md. It fuzzes the build that ships (compiled), as the load benches do.
# Examples: make fuzz ARGS="--count 100000 --seed 7 --jobs 2"
#   make fuzz BUILD=src ARGS="--atheris -- -runs=200000"   (coverage-guided, so on src/ as
#   Python: atheris sees no coverage inside compiled modules; pip install -e '.[fuzz]')
fuzz:
	$(PREPARE)
	$(BENCH) bench/fuzz.py $(ARGS)
