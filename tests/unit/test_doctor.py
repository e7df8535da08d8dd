"""doctor's pieces that need no subprocess: reading a smoke run's report, CANN's version files."""

from __future__ import annotations

from pathlib import Path

from agentbench_npu.doctor.checks import cann_version
from agentbench_npu.doctor.command import smoke_command, smoke_verdict


def report(status: str, gates: dict[str, bool], error: str | None = None) -> dict:
    return {"status": status, "error": error, "environment": {"device": "cuda", "device_name": "H100"},
            "gates": [{"name": n, "passed": p} for n, p in gates.items()],
            "steps": [{"logprob_abs_diff_mean": 0.012, "weight_sync_seconds": 0.25}]}


def test_a_passed_smoke_run_is_ok_and_says_what_it_measured(tmp_path):
    check = smoke_verdict(report("passed", {"logprob_alignment": True, "weight_sync": True}), 0, "", tmp_path, 12.3)
    assert check.status == "ok"
    assert check.detail == ("passed on cuda (H100) in 12 s: logprob_alignment pass, weight_sync pass; "
                            "Δlogp mean 1.2e-02, sync 250 ms")


def test_a_failed_gate_fails_the_smoke_and_points_at_the_kept_run_dir(tmp_path):
    check = smoke_verdict(report("failed", {"logprob_alignment": False, "weight_sync": True}), 1, "", tmp_path, 5)
    assert check.status == "fail" and "logprob_alignment FAIL" in check.detail and str(tmp_path) in check.detail


def test_a_run_without_gates_or_report_is_not_a_pass(tmp_path):
    assert smoke_verdict(report("passed", {}), 0, "", tmp_path, 1).status == "fail"
    died = smoke_verdict(None, 2, "loading...\nerror: model dir '/m' does not exist\n", tmp_path, 1)
    assert died.status == "fail" and "error: model dir '/m' does not exist" in died.detail


def test_the_smoke_run_is_one_colocated_step_of_base_with_two_gates(tmp_path):
    argv = smoke_command("npu", "/models/Qwen3-4B", tmp_path)
    assert argv[1:5] == ["-m", "agentbench_npu", "run", "base"]
    assert argv[argv.index("--steps") + 1] == "1" and argv[argv.index("--device") + 1] == "npu"
    assert argv[argv.index("--gates") + 1] == "logprob_alignment,weight_sync" and "--executor" not in argv


def test_cann_version_from_the_install_info_or_version_cfg(tmp_path: Path):
    assert cann_version(tmp_path) is None
    (tmp_path / "version.cfg").write_text('# toolkit\nVersion="7.0.0"\n')
    assert cann_version(tmp_path) == "7.0.0"
    (tmp_path / "aarch64-linux").mkdir()
    (tmp_path / "aarch64-linux" / "ascend_toolkit_install.info").write_text("arch=aarch64\nversion=8.2.RC1\n")
    assert cann_version(tmp_path) == "8.2.RC1"  # the install info wins
