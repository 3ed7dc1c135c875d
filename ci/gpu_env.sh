# Sourced by the GPU bundle's scripts (run.sh, planted-bugs.sh): puts the CUDA libraries
# cudarc loads on LD_LIBRARY_PATH where ldconfig does not know them: libnvrtc and
# libcublas from the toolkit or the nvidia wheels (PyTorch's venv has them). The driver's
# libcuda is found by the loader as usual.
for lib in libnvrtc.so libcublas.so; do
  if ! ldconfig -p | grep -q "$lib"; then
    dir=$(find /usr/local/cuda/lib64 /usr/local/cuda*/targets/*/lib /opt /usr/lib /usr/local/lib \
            -name "$lib.*" -not -name '*alt*' 2>/dev/null | head -1 | xargs -r dirname)
    [ -n "$dir" ] && export LD_LIBRARY_PATH=$dir:${LD_LIBRARY_PATH:-}
  fi
done
