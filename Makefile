# YOLO11 -> ModelOpt INT8 Q/DQ -> TensorRT recipe book. `make help` lists the targets and knobs; `make print-VAR`
# shows what a knob resolves to. Recipes (recipes/*.yaml, one per configuration for every model size: MODEL= picks
# the size) are data: a new configuration is a new recipe file, never a new rule here.

## knobs (make VAR=value ...)
VENV       ?= .venv#                                   environment `make` creates on first use (PY=python3 skips it)
PY         ?= $(VENV)/bin/python#                      the Python that runs the tools (py311 on the devkit)
MODEL      ?= $(or $(filter yolo%,$(basename $(notdir $(PT)))),yolo11n)#  the size recipes run on (models/yolo11/MODEL.onnx; PT=yolo11s.pt: yolo11s)
RECIPES    ?= $(sort $(wildcard recipes/*.yaml))#       the recipes `all`, `cpu`, `gpu` run
RECIPE     ?= recipes/int8-qdq.yaml#                   the recipe one-recipe targets run
ONNX       ?= models/yolo11/$(MODEL).onnx#             the model: export writes it; set it to start every recipe from another ONNX
PT         ?=#                                          a .pt checkpoint (or ultralytics .yaml) for `make export`
CALIB_DIR  ?= calib/images#                            calibration images (never evaluation images)
CALIB_IMAGES ?= $(if $(filter calib/images,$(CALIB_DIR)),32)#  cap on the recipes' calib_images (32 images ship)
EVAL_DIR   ?= data/coco-mini#                          evaluation images/ + annotations.json (+ exact_ids.txt)
EVAL_LIMIT ?=#                                          score only the first N evaluation images
RESULTS    ?= runs#                                    where records and tables go; results/ holds the committed ones
OVERWRITE  ?=#                                          1: let a run replace committed result files
PROFILES   ?=#                                          comma-separated deployment profiles to build (default: all)
LEVEL      ?=#                                          build every recipe at this builder level (default: each recipe's own)
TRT_VERSION ?=#                                         plan for this TensorRT (default: the installed one, else 10)
TRTEXEC    ?= $(if $(shell command -v trtexec 2>/dev/null),trtexec,$(PY) -m tools.trtexec_py)
POLYGRAPHY ?= $(if $(shell command -v polygraphy 2>/dev/null),polygraphy,$(PY) -m tools.polygraphy_cli)
GRID       ?= recipes/grids/$(MODEL).yaml#             the sweep's grid
GPUS       ?=#                                          comma-separated GPU indices for the sweep (default: all visible)
JOBS_PER_GPU ?= 1#                                      builds side by side on one GPU in a sweep (timings run alone)
SWEEP_ARGS ?=#                                          more tools.sweep flags, e.g. --stop-after 420 --shard 1/2
BUDGET     ?= 0.5#                                      mAP50-95 points INT8 may lose against FP16 in the report's rule
SENS_IMAGES ?= 32#                                      calibration images the sensitivity analysis measures on
SENS_UNIT  ?= block#                                    what sensitivity puts back in float at a time: block | layer
SENS_TARGET ?= 0.95#                                    agreement with FP32 the sensitivity proposal aims for
SENS_GROUPS ?= 4#                                       most blocks or layers the sensitivity proposal keeps in float
SENS_PROFILE ?=#                                         by-block.csv of `make profile`: latency-aware proposal
MS_BUDGET ?=#                                            with SENS_PROFILE: most ms the float blocks or layers may add
E2E ?= fp16 int8-dfl-mse fp16-e2e int8-dfl-mse-e2e#     recipes (recipes/NAME.yaml) `make e2e` times end to end
E2E_ARGS ?=#                                             more tools.e2e flags, e.g. --streams 4 --frames 128
SOURCE     ?= data/coco-mini/images#                   what `make predict` detects in: an image, a folder of images or a video
MODEL_FILE ?=#                                          an engine or ONNX `make predict` runs instead of RECIPE's own
CONF       ?= 0.25#                                    `make predict`'s score threshold: ultralytics predict's default
IOU        ?= 0.7#                                     `make predict`'s NMS IoU; an engine with NMS inside keeps its own

KNOBS = VENV PY MODEL RECIPES RECIPE ONNX PT CALIB_DIR CALIB_IMAGES EVAL_DIR EVAL_LIMIT RESULTS OVERWRITE PROFILES LEVEL \
        TRT_VERSION TRTEXEC POLYGRAPHY GRID GPUS JOBS_PER_GPU SWEEP_ARGS BUDGET SENS_IMAGES SENS_UNIT \
        SENS_TARGET SENS_GROUPS SENS_PROFILE MS_BUDGET E2E E2E_ARGS SOURCE MODEL_FILE CONF IOU

# the one-recipe targets check RECIPE before doing anything
ONE_RECIPE = calib quantize onnxrt engine bench accuracy sensitivity profile inspect ultralytics predict
ifneq ($(filter $(ONE_RECIPE),$(MAKECMDGOALS)),)
ifeq ($(wildcard $(RECIPE)),)
$(error RECIPE=$(RECIPE) does not exist; the recipes are: $(notdir $(RECIPES)))
endif
endif

# the environment: created on first use from requirements.txt unless PY names another Python
ENV = $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

user_set = $(filter command line environment,$(origin $(1)))
MODEL_ARG = --model $(MODEL)
SETUP = --calib-dir "$(CALIB_DIR)" --eval-dir "$(EVAL_DIR)" --results "$(RESULTS)" --trtexec "$(TRTEXEC)" \
        --polygraphy "$(POLYGRAPHY)" $(if $(TRT_VERSION),--trt $(TRT_VERSION)) \
        $(if $(EVAL_LIMIT),--eval-limit $(EVAL_LIMIT)) $(if $(CALIB_IMAGES),--calib-images $(CALIB_IMAGES)) \
        $(if $(call user_set,ONNX),--onnx "$(ONNX)") $(if $(PROFILES),--profiles $(PROFILES)) \
        $(if $(LEVEL),--level $(LEVEL)) $(if $(OVERWRITE),--overwrite)
PIPELINE = $(PY) -m tools.pipeline $(MODEL_ARG)
SUMMARY = $(PY) -m tools.summary $(MODEL_ARG) $(RECIPES) $(SETUP)

.PHONY: help all gpu cpu export calib quantize onnxrt engine bench accuracy profile inspect ultralytics summary \
        sweep sensitivity report sizes e2e predict test clean

help:  ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "knobs (make VAR=value):"
	@grep -E '^[A-Z0-9_]+ +\?=.*#' $(MAKEFILE_LIST) | sed -E 's/^([A-Z0-9_]+) +\?= *([^#]*)# *(.*)/  \1 (\3)/'
	@echo "  TRTEXEC (trtexec command; now: $(TRTEXEC))"
	@echo "  POLYGRAPHY (polygraphy command; now: $(POLYGRAPHY))"

print-%:  ## show what a knob resolves to, e.g. make print-TRTEXEC
	@echo '$*=$($*)'

all: $(ENV) export  ## every recipe of MODEL end to end, then the summary (CPU-only machines do the CPU half)
	$(PIPELINE) all $(RECIPES) $(SETUP)
	$(SUMMARY)

cpu: $(ENV) export  ## CPU half of `all`: calibration tensors, ModelOpt quantization, ONNX Runtime mAP
	$(PIPELINE) cpu $(RECIPES) $(SETUP)

gpu: $(ENV)  ## GPU half of `all`: engines, timings, accuracy (needs the quantized models from `make cpu`)
	$(PIPELINE) gpu $(RECIPES) $(SETUP)
	$(SUMMARY)

export: $(ENV)  ## check ONNX is a YOLO detector; with PT=model.pt (or PT=yolo11s.yaml) export it through ultralytics
	$(PY) -m tools.export $(if $(PT),--pt "$(PT)") --onnx "$(ONNX)"

calib: $(ENV)  ## calibration tensor (.npy) of RECIPE from CALIB_DIR
	$(PIPELINE) calib $(RECIPE) $(SETUP)

quantize: $(ENV)  ## ModelOpt INT8 Q/DQ model of RECIPE
	$(PIPELINE) quantize $(RECIPE) $(SETUP)

onnxrt: $(ENV)  ## COCO mAP of RECIPE's ONNX (FP32 or Q/DQ) in ONNX Runtime
	$(PIPELINE) onnxrt $(RECIPE) $(SETUP)

engine: $(ENV)  ## TensorRT engines of RECIPE, one per deployment profile (trtexec or the fallback)
	$(PIPELINE) engine $(RECIPE) $(SETUP)

bench: $(ENV)  ## latency percentiles and throughput of RECIPE's engines at their batches, CUDA graphs off/on
	$(PIPELINE) engine,bench $(RECIPE) $(SETUP)

accuracy: $(ENV)  ## COCO mAP of RECIPE's engines + polygraphy comparison against ONNX Runtime
	$(PIPELINE) engine,accuracy $(RECIPE) $(SETUP)

profile: $(ENV)  ## per-layer time and precision of RECIPE's engines beside FP16's, by YOLO block (CSV + plot)
	$(PIPELINE) engine,layers recipes/fp16.yaml $(RECIPE) $(SETUP)
	$(PY) -m tools.profile $(MODEL_ARG) --recipes recipes/fp16.yaml $(RECIPE) --results "$(RESULTS)" \
	    $(if $(PROFILES),--profiles $(PROFILES)) $(if $(OVERWRITE),--overwrite)

inspect: $(ENV)  ## `polygraphy inspect model` on RECIPE's engines (TensorRT >= 8.6.1), else on their ONNX
	$(PY) -m tools.polygraphy_inspect $(MODEL_ARG) $(RECIPE) $(SETUP)

ultralytics: $(ENV)  ## copies of RECIPE's engines with ultralytics' header: YOLO("x.ultralytics.engine") loads them
	$(PY) -m tools.ultralytics_engine $(MODEL_ARG) --recipe $(RECIPE) --results "$(RESULTS)" \
	    $(if $(PROFILES),--profiles $(PROFILES))

summary: $(ENV)  ## RESULTS/MODEL/summary.{json,csv,md} from this evaluation set's records
	$(SUMMARY)

sensitivity: $(ENV)  ## which blocks (or layers) cost accuracy when INT8, and the smallest exclusion set proposed
	$(PY) -m tools.sensitivity $(MODEL_ARG) $(RECIPE) --calib-dir "$(CALIB_DIR)" --eval-dir "$(EVAL_DIR)" \
	    --images $(SENS_IMAGES) --unit $(SENS_UNIT) --target $(SENS_TARGET) --max-groups $(SENS_GROUPS) \
	    $(if $(CALIB_IMAGES),--calib-images $(CALIB_IMAGES)) $(if $(SENS_PROFILE),--profile "$(SENS_PROFILE)") \
	    -o "$(RESULTS)/$(MODEL)/sensitivity$(if $(filter layer,$(SENS_UNIT)),-layers)$(if $(SENS_PROFILE),-latency).json" \
	    $(if $(MS_BUDGET),--ms-budget $(MS_BUDGET)) $(if $(OVERWRITE),--overwrite) \
	    $(if $(TRT_VERSION),--trt $(TRT_VERSION))

# the grid's `model:` is its size: MODEL= goes along only where set, so that a grid of another size is refused
sweep: $(ENV)  ## expand GRID into recipes and run each point end to end on every GPU (cached, resumable)
	$(PY) -m tools.sweep $(GRID) $(if $(call user_set,MODEL),$(MODEL_ARG)) $(SETUP) $(if $(GPUS),--gpus $(GPUS)) \
	    --jobs-per-gpu $(JOBS_PER_GPU) $(SWEEP_ARGS)

report: $(ENV)  ## REPORT.md: the sweep table, Pareto plots, the chosen configuration and the deployment guide
	$(PY) -m tools.report --model $(MODEL) --budget $(BUDGET) --results "$(RESULTS)" $(if $(OVERWRITE),--overwrite)

sizes: $(ENV)  ## RESULTS/sizes.{md,csv}: INT8 over FP16 speed-up by model size, from every model's sweep
	$(PY) -m tools.sizes --results "$(RESULTS)" $(if $(OVERWRITE),--overwrite)

E2E_RECIPES = $(foreach r,$(E2E),recipes/$(r).yaml)
e2e: $(ENV)  ## FP16 and INT8, raw and end-to-end engines: preprocess, copies, inference, NMS, whole-loop img/s
	$(PIPELINE) engine $(E2E_RECIPES) $(SETUP)
	$(PY) -m tools.e2e $(MODEL_ARG) $(E2E_RECIPES) $(SETUP) $(E2E_ARGS)

predict: $(ENV)  ## annotated SOURCE + detections JSON with RECIPE's engine (ONNX Runtime on a CPU machine)
	$(PY) -m tools.predict "$(SOURCE)" $(RECIPE) $(MODEL_ARG) --conf $(CONF) --iou $(IOU) --results "$(RESULTS)" \
	    --calib-dir "$(CALIB_DIR)" $(if $(CALIB_IMAGES),--calib-images $(CALIB_IMAGES)) \
	    $(if $(MODEL_FILE),--model-file "$(MODEL_FILE)") $(if $(LEVEL),--level $(LEVEL)) $(if $(TRT_VERSION),--trt $(TRT_VERSION))

test: $(ENV)  ## the test suite (GPU tests skip without TensorRT and a GPU)
	$(PY) -m pytest -q tests

clean: $(ENV)  ## remove the files runs wrote for MODEL (build products, RESULTS/MODEL); keeps every other file
	$(PY) -m tools.records clean --model $(MODEL) --results "$(RESULTS)"
