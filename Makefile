# `make demo`: set up and run the main job on a small built-in dataset. `make test`: set up and
# pass the tests. Both create .venv on first use (torch 2.13.0 CPU wheel, then the project).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev,cu12]'
	touch $@

setup: $(VENV)/.installed

# The whole product on a small built-in dataset, on a 2-core CPU in minutes (4 min 32 s measured
# with ~60 % of a shared machine; BENCHMARKS.md): make 3,200
# samples (40 backgrounds x 40 objects, one placement each: varied samples seen few times beat
# few seen often), shard them with a 10 % validation split (320 samples: a figure, not noise)
# and verify them, train the default model (unet) on 2 ranks under torchrun at 64 px, 4 epochs
# (360 steps), predict, export, evaluate (the last line: validation mask IoU and depth rms, each
# beside its non-learned baseline's). BENCHMARKS.md, "A better model from the same samples".
demo: setup
	$(BIN)/depthcli make-dataset --out data/demo --num-bg 40 --num-fg 40 --placements 1 --overwrite
	$(BIN)/depthcli shard --src data/demo --out shards --shard-size 400 --val-fraction 0.1 --overwrite
	$(BIN)/depthcli verify shards --decode
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node 2 train/main.py --shards shards --res 64 \
		--batch-size 16 --epochs 4 --out runs/demo
	$(BIN)/depthcli predict --checkpoint runs/demo/best.pt --bg data/demo/bg/bg001.jpg \
		--fg-bg data/demo/fg_bg/bg001/bg001_fg001_F_000000.jpg --out runs/demo/predict
	$(BIN)/depthcli export --checkpoint runs/demo/best.pt --out runs/demo/model.onnx
	@echo "pictures in runs/demo/vis/ and runs/demo/predict/, the model in runs/demo/model.onnx"
	$(BIN)/depthcli evaluate --checkpoint runs/demo/best.pt --shards shards --baseline

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup demo test
