import os
import shutil

# Triton needs its interpreter on a machine without an NVIDIA GPU, and reads this variable when kernels are
# decorated, so it is set here before any test module imports triton.
if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
