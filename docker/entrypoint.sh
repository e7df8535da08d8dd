#!/usr/bin/env bash
# The images' entry point: CANN's environment when the image has one, then `agentbench-npu ARGS` (default: doctor).
# CANN's scripts are sourced without -e: a line in them that fails must not end the container unexplained
# (doctor then says what is missing).
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    # shellcheck disable=SC1090
    if [ -f "$env_script" ] && ! source "$env_script"; then
        echo "entrypoint: sourcing $env_script failed; going on" >&2
    fi
done
exec agentbench-npu "$@"
