# Source this first in a command on the lent GPU machine (repository root): it installs the packages that
# machine lacks (pydantic and its needs, carried as wheels in .gpu-wheels/, see the device notes) and mxmoe
# itself into /tmp/site, without network.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-wheels/*.whl || return 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    >/dev/null || return 1
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, mxmoe.core; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
