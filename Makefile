# pixelface: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test install sysdeps bench clean

# Create .venv and install the project (editable) with test and benchmark extras.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	@$(MAKE) --no-print-directory sysdeps
	@touch $(STAMP)

install: $(STAMP)

# open3d needs the Debian package libusb-1.0-0 to import.
sysdeps:
	@if ! $(BIN)/python -c "import open3d" >/dev/null 2>&1; then \
	  if ldconfig -p | grep -q 'libusb-1.0.so.0'; then \
	    echo "open3d fails to import for a reason other than libusb:"; $(BIN)/python -c "import open3d"; exit 1; \
	  elif [ "$$(id -u)" = 0 ]; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else \
	    echo "open3d needs libusb: run 'sudo apt-get install -y libusb-1.0-0' and retry"; exit 1; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/pixelface demo --work work/demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.synth --size full --json work/bench/synth.json

clean:
	rm -rf work .pytest_cache
