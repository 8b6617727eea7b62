# Set-up and the main jobs. `make test` and `make demo` work from a fresh clone with only Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Exact versions for this machine: torch 2.13.0 is the CPU build on local disk (an unpinned torch
# pulls GBs of CUDA wheels); triton and numpy pinned because the interpreter breaks across releases.
PINS := torch==2.13.0 triton==3.9.0 numpy==2.4.6 transformers==5.23.0 gguf==0.19.0 safetensors==0.8.0
STAMP := $(VENV)/.installed
MODEL := smollm2-135m
HEAL_STEPS ?= 60

.PHONY: test demo clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list or the pins change.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PINS) -e '.[dev,server]'
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, said in words.
test: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

# Pull, compress with SoCo at 0.3 (a short CPU budget: ~3 min), heal the factors by distillation from the
# dense model (~3 min), compare perplexity on the first 100k characters of valid.txt, then chat with the
# compressed model before and after healing through the engine.
COMPRESSED := models/$(MODEL)-soco-0.3
HEALED := models/$(MODEL)-soco-0.3-healed
PROMPT := "Write a Python function that returns the n-th Fibonacci number."
demo: $(STAMP)
	$(BIN)/lowrank pull $(MODEL)
	$(BIN)/lowrank compress $(MODEL) --ratio 0.3 --method soco --samples 32 --seq-len 256 --steps 80 \
		--out $(COMPRESSED) --force
	$(BIN)/lowrank heal $(COMPRESSED) --steps $(HEAL_STEPS) --heal-batch-size 2 --out $(HEALED) --force
	$(BIN)/lowrank eval $(MODEL) --max-chars 100000
	$(BIN)/lowrank eval $(COMPRESSED) --max-chars 100000
	$(BIN)/lowrank eval $(HEALED) --max-chars 100000
	$(BIN)/lowrank generate $(MODEL) --chat --max-tokens 96 $(PROMPT)
	$(BIN)/lowrank generate $(COMPRESSED) --chat --max-tokens 96 $(PROMPT)
	$(BIN)/lowrank generate $(HEALED) --chat --max-tokens 96 $(PROMPT)

clean-venv:
	rm -rf $(VENV)
