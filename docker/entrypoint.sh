#!/usr/bin/env bash
# The images' entry point: CANN's environment when the image has one, then `agentbench-npu ARGS` (default: doctor).
set -eo pipefail
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    # shellcheck disable=SC1090
    [ -f "$env_script" ] && source "$env_script"
done
exec agentbench-npu "$@"
