# Sourced by h200.sh and linear_gpu.sh, after they define `say` and `$log`: the machine's
# description into the log, the Vulkan loader from .gl where the machine has none, and the
# NVIDIA driver's Vulkan ICD and EGL vendor where the machine mounts them.
say "machine"
{
    uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
} >>"$log" 2>&1

if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
    say "unpacking the Vulkan loader from .gl"
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
nvidia_share=/usr/local/nvidia/share
if [ -f "$nvidia_share/vulkan/icd.d/nvidia_icd.json" ]; then
    export VK_DRIVER_FILES=$nvidia_share/vulkan/icd.d/nvidia_icd.json
    export __EGL_VENDOR_LIBRARY_FILENAMES=$nvidia_share/glvnd/egl_vendor.d/10_nvidia.json
fi
