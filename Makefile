# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: test quickstart lint format bench-tiny browser mutants

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# The web page tests drive Debian's chromium through Playwright (never a downloaded browser).
browser:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium (apt-get) for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
		|| echo "could not install chromium (needs root and Debian's apt): the web page tests will fail"; }

test: $(STAMP) browser
	$(PY) -m pytest -q

# Fine-tune the bundled tiny model (4-bit base + LoRA, CPU, about a minute; tokenizer and base made on first use),
# then ask the result a question (greedy).
quickstart: $(STAMP)
	$(PY) main_finetune.py
	$(PY) demo.py --prompt "What is the opposite of hot?" --temperature 0

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench-tiny: $(STAMP)
	$(PY) bench/build_memory.py --shape tiny

# Mutation check (slow, not part of `test`): small bugs put in one at a time, caught / missed for each.
mutants: $(STAMP)
	$(PY) scripts/mutants.py
