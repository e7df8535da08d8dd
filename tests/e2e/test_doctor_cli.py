"""`agentbench-npu doctor`: says truthfully what this machine has and lacks, and fails only on what is required."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

FAKE_ASCEND = Path(__file__).resolve().parents[1] / "support" / "fake_ascend"


def doctor_json(cli, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    proc = cli("doctor", "--json", *args, env=env)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    return proc.returncode, report, {c["name"]: c for c in report["checks"]}


def fake_cann(root: Path, version: str = "8.1.RC1") -> Path:
    home = root / "ascend-toolkit" / "latest"
    (home / "x86_64-linux").mkdir(parents=True)
    (home / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={version}\narch=x86_64\n")
    return home


def test_this_cpu_machine_is_ready_and_the_absent_accelerator_stack_is_said_not_failed(cli):
    code, report, checks = doctor_json(cli)
    assert code == 0 and report["ready"] and report["device"] == "cpu"
    assert checks["torch"]["status"] == "ok" and checks["torch"]["detail"] == torch.__version__
    assert checks["gloo"]["status"] == "ok"  # a real one-rank group, not a flag
    assert checks["cpu"]["status"] == "ok" and "cores" in checks["cpu"]["detail"]
    assert checks["cache"]["status"] == "ok" and os.environ["AGENTBENCH_NPU_CACHE"] in checks["cache"]["detail"]
    assert checks["local"]["status"] == "ok"  # ran python3 in a real sandbox
    for absent in ("torch_npu", "sglang", "CANN toolkit", "npu", "hccl"):
        assert checks[absent]["status"] == "absent", checks[absent]
    # the test extra installs megatron-core (its model runs on the CPU in tests): found, with its version
    megatron = importlib.metadata.version("megatron-core") if importlib.util.find_spec("megatron") else None
    assert checks["megatron-core"]["status"] == ("ok" if megatron else "absent")
    assert not megatron or checks["megatron-core"]["detail"] == megatron
    assert "agentbench-npu[npu]" in checks["torch_npu"]["detail"]
    if torch.version.cuda is None:
        assert checks["cuda"]["status"] == "absent" and "without CUDA" in checks["cuda"]["detail"]
    assert report["counts"]["fail"] == 0 and report["counts"]["absent"] >= 6


def test_checking_for_an_npu_here_fails_and_names_each_missing_part(cli):
    code, report, checks = doctor_json(cli, "--device", "npu")
    assert code == 1 and not report["ready"]
    failed = {name for name, c in checks.items() if c["status"] == "fail"}
    assert {"torch_npu", "CANN toolkit", "npu", "hccl"} <= failed
    assert "set_env.sh" in checks["CANN toolkit"]["detail"]
    # the environment RL on Ascend wants, said as warnings (not failures)
    assert checks["VLLM_ASCEND_ENABLE_NZ"]["status"] == "warn"
    assert checks["HCCL_DETERMINISTIC"]["status"] == "warn"


def test_the_human_readable_form_marks_each_failure_and_ends_with_the_verdict(cli):
    proc = cli("doctor", "--require", "sglang")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any("✗ sglang" in line and "agentbench-npu[sglang]" in line for line in lines)
    assert lines[-1].startswith("FAILED:") and "1 failed" in lines[-1]


def test_a_fake_ascend_host_reports_its_npus_memory_cann_and_hccl(cli, tmp_path):
    env = {"PYTHONPATH": f"{FAKE_ASCEND}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ASCEND_TOOLKIT_HOME": str(fake_cann(tmp_path)), "VLLM_ASCEND_ENABLE_NZ": "0",
           "HCCL_DETERMINISTIC": "true"}
    code, report, checks = doctor_json(cli, env=env)
    assert code == 0 and report["device"] == "npu"  # auto picks the NPU over the CPU
    assert checks["torch_npu"] == {"group": "stack", "name": "torch_npu", "status": "ok", "detail": "0.0.0+fake"}
    assert checks["CANN toolkit"]["status"] == "ok" and checks["CANN toolkit"]["detail"].startswith("8.1.RC1 at ")
    assert checks["npu"]["detail"] == ("0: Ascend910B3 (FAKE) 64 GiB (60 free); "
                                       "1: Ascend910B3 (FAKE) 64 GiB (60 free)")
    assert checks["hccl"]["status"] == "ok"
    assert checks["VLLM_ASCEND_ENABLE_NZ"]["status"] == checks["HCCL_DETERMINISTIC"]["status"] == "ok"

    env["VLLM_ASCEND_ENABLE_NZ"] = "1"
    code, report, checks = doctor_json(cli, env=env)
    assert code == 0 and checks["VLLM_ASCEND_ENABLE_NZ"]["status"] == "warn"
    assert "want 0" in checks["VLLM_ASCEND_ENABLE_NZ"]["detail"]


def test_an_optional_package_that_is_installed_but_broken_is_a_failure(cli, tmp_path):
    assert importlib.util.find_spec("sglang") is None
    (tmp_path / "site" / "sglang").mkdir(parents=True)
    (tmp_path / "site" / "sglang" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open')\n")
    code, _, checks = doctor_json(cli, env={"PYTHONPATH": str(tmp_path / "site")})
    assert code == 1
    assert checks["sglang"]["status"] == "fail" and "libcuda.so.1" in checks["sglang"]["detail"]


def test_an_unwritable_cache_fails_and_says_which_variable_to_change(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, checks = doctor_json(cli, env={"AGENTBENCH_NPU_CACHE": str(blocker / "cache")})
    assert code == 1 and checks["cache"]["status"] == "fail"
    assert "$AGENTBENCH_NPU_CACHE" in checks["cache"]["detail"]


def test_modal_credentials_are_found_but_not_contacted(cli):
    _, _, checks = doctor_json(cli, env={"MODAL_TOKEN_ID": "ak-x", "MODAL_TOKEN_SECRET": "as-y"})
    assert checks["modal"]["status"] == "ok" and "not contacted" in checks["modal"]["detail"]


def test_bad_usage_is_an_error_not_a_verdict(cli, tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "x").write_text("")
    proc = cli("doctor", "--smoke", "--out", str(tmp_path / "kept"))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = cli("doctor", "--device", "tpu")
    assert proc.returncode == 2 and "unknown device" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_one_colocated_step_of_base_and_reports_its_gates(cli, tmp_path):
    code, _, checks = doctor_json(cli, "--smoke", "--out", str(tmp_path / "smoke"))
    smoke = checks["run base (1 step)"]
    assert code == 0 and smoke["status"] == "ok", smoke
    assert "logprob_alignment pass" in smoke["detail"] and "weight_sync pass" in smoke["detail"]
    report = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert report["status"] == "passed" and len(report["steps"]) == 1
    assert report["environment"]["cluster"]["mode"] == "colocate"


@pytest.mark.slow
def test_a_smoke_run_that_cannot_start_fails_the_doctor_with_the_runs_error(cli, tmp_path):
    code, _, checks = doctor_json(cli, "--smoke", "--model", str(tmp_path / "no-such-model"))
    smoke = checks["run base (1 step)"]
    assert code == 1 and smoke["status"] == "fail"
    assert "no report" in smoke["detail"] and "no-such-model" in smoke["detail"]
