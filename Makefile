# YOLO11 -> ModelOpt INT8 Q/DQ -> TensorRT recipe book. `make help` lists the targets; `make print-VAR` shows a knob.
# Recipes (recipes/<model>/*.yaml) are data: a new configuration is a new recipe file, never a new rule here.

PY         ?= python3
MODEL      ?= yolo11n
RECIPES    ?= $(sort $(wildcard recipes/$(MODEL)/*.yaml))
RECIPE     ?= recipes/$(MODEL)/int8-qdq.yaml
ONNX       ?= models/yolo11/$(MODEL).onnx
PT         ?=
CALIB_DIR  ?= calib/images
# the recipes calibrate on 400 images; the 32 that ship are enough to run everything, so they override the count
CALIB_IMAGES ?= $(if $(filter calib/images,$(CALIB_DIR)),32)
EVAL_DIR   ?= data/coco-mini
EVAL_LIMIT ?=
TRT_VERSION ?=
GRID       ?= recipes/grids/$(MODEL).yaml
BUDGET     ?= 0.5
SENS_IMAGES ?= 32
SWEEP_ARGS ?=
TRTEXEC    ?= $(if $(shell command -v trtexec 2>/dev/null),trtexec,$(PY) -m tools.trtexec_py)
POLYGRAPHY ?= $(if $(shell command -v polygraphy 2>/dev/null),polygraphy,$(PY) -m tools.polygraphy_cli)

# the one-recipe targets check RECIPE before doing anything
ifneq ($(filter calib quantize onnxrt engine bench accuracy sensitivity,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(RECIPE)),)
$(error RECIPE=$(RECIPE) does not exist; recipes for MODEL=$(MODEL) are: $(notdir $(RECIPES)))
endif
endif

SETUP = --calib-dir "$(CALIB_DIR)" --eval-dir "$(EVAL_DIR)" --trtexec "$(TRTEXEC)" --polygraphy "$(POLYGRAPHY)" \
        $(if $(TRT_VERSION),--trt $(TRT_VERSION)) $(if $(EVAL_LIMIT),--eval-limit $(EVAL_LIMIT)) \
        $(if $(CALIB_IMAGES),--calib-images $(CALIB_IMAGES))
PIPELINE = $(PY) -m tools.pipeline

.PHONY: help all gpu cpu export calib quantize onnxrt engine bench accuracy summary sweep sensitivity report test clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  knobs: MODEL=$(MODEL) RECIPE=$(RECIPE) CALIB_DIR=$(CALIB_DIR) EVAL_DIR=$(EVAL_DIR) GRID=$(GRID)"
	@echo "  trtexec: $(TRTEXEC)"

print-%:  ## show what a knob resolves to, e.g. make print-TRTEXEC
	@echo '$*=$($*)'

all: export  ## every recipe of MODEL end to end, then the summary table (CPU-only machines do the CPU half)
	$(PIPELINE) all $(RECIPES) $(SETUP)
	$(PY) -m tools.summary --model $(MODEL) --eval-dir "$(EVAL_DIR)" --calib-dir "$(CALIB_DIR)" $(if $(EVAL_LIMIT),--eval-limit $(EVAL_LIMIT))

cpu: export  ## CPU half of `all`: calibration tensors, ModelOpt quantization, ONNX Runtime mAP
	$(PIPELINE) cpu $(RECIPES) $(SETUP)

gpu:  ## GPU half of `all`: engines, timings, accuracy (needs the quantized models from `make cpu`)
	$(PIPELINE) gpu $(RECIPES) $(SETUP)

export:  ## check the ONNX is a YOLO detector; with PT=model.pt export it through ultralytics first
	$(PY) -m tools.export $(if $(PT),--pt "$(PT)") --onnx "$(ONNX)"

calib:  ## calibration tensor (.npy) of RECIPE from CALIB_DIR
	$(PIPELINE) calib $(RECIPE) $(SETUP)

quantize:  ## ModelOpt INT8 Q/DQ model of RECIPE
	$(PIPELINE) quantize $(RECIPE) $(SETUP)

onnxrt:  ## COCO mAP of RECIPE's ONNX (FP32 or Q/DQ) in ONNX Runtime
	$(PIPELINE) onnxrt $(RECIPE) $(SETUP)

engine:  ## TensorRT engine of RECIPE (trtexec or the fallback)
	$(PIPELINE) engine $(RECIPE) $(SETUP)

bench:  ## latency percentiles and throughput of RECIPE's engine at its bench batches, CUDA graphs off/on
	$(PIPELINE) engine,bench $(RECIPE) $(SETUP)

accuracy:  ## COCO mAP of RECIPE's engine + polygraphy comparison against ONNX Runtime
	$(PIPELINE) engine,accuracy $(RECIPE) $(SETUP)

summary:  ## results/MODEL/summary.{json,csv,md} from the finished records
	$(PY) -m tools.summary --model $(MODEL) --eval-dir "$(EVAL_DIR)" --calib-dir "$(CALIB_DIR)" $(if $(EVAL_LIMIT),--eval-limit $(EVAL_LIMIT))

sensitivity:  ## which blocks cost accuracy when INT8, and the smallest exclusion set proposed
	$(PY) -m tools.sensitivity $(RECIPE) --calib-dir "$(CALIB_DIR)" --eval-dir "$(EVAL_DIR)" --images $(SENS_IMAGES)

sweep:  ## expand GRID into recipes and run each end to end (cached, resumable)
	$(PY) -m tools.sweep $(GRID) $(SETUP) $(SWEEP_ARGS)

report:  ## REPORT.md with the table, Pareto plots, the chosen configuration and the deployment guide
	$(PY) -m tools.report --model $(MODEL) --budget $(BUDGET)

test:  ## the test suite (GPU tests skip without TensorRT)
	$(PY) -m pytest -q tests

clean:  ## remove engines, logs and generated models (keeps results/)
	rm -rf engines/$(MODEL) logs/$(MODEL) models/$(MODEL) calib/$(MODEL)
