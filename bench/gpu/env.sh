# Sourced by the bench/gpu/run_*.sh scripts: the environment of an offline CUDA host, and `install`.
# The wheels come from `make wheelhouse` (.wheelhouse/) and install into $SITE, outside the host's own Python.
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# onnxruntime-gpu finds CUDA and cuDNN where torch's wheels put them (also in the processes the stages spawn)
nvidia_libs=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'lib'))})))" 2>/dev/null || true)
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# optimize.lora_layout=fused attaches olive_lab/kernels' CUDA library: the one `make gpu-kernels` built, since the
# GPU host need not have nvcc
if [ -f .gpu/kernels/libolive_lab_kernels.so ]; then
  export OLIVE_LAB_KERNELS=${OLIVE_LAB_KERNELS:-$PWD/.gpu/kernels/libolive_lab_kernels.so}
fi

install() {
  if [ ! -d .wheelhouse ]; then
    echo "no .wheelhouse/ here: run \`make wheelhouse\` where there is internet and copy it along" >&2
    return 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .wheelhouse/*.whl
  python3 -c "import onnxruntime as ort, onnxruntime_genai as og; print('ORT', ort.__version__, ort.get_available_providers(), 'genai', og.__version__)"
}
