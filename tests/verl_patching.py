"""Apply one of patches/ to a temporary copy of the installed verl (dry run first)."""

import importlib.util
import pathlib
import shutil
import subprocess

PATCHES = pathlib.Path(__file__).resolve().parents[1] / "patches"
INSTALLED_VERL = pathlib.Path(importlib.util.find_spec("verl").submodule_search_locations[0])


def apply_to_copy_of_installed_verl(patch_name: str, files: list[str] | None, root: pathlib.Path) -> pathlib.Path:
    """Copy `files` (paths like "verl/utils/distributed.py") of the installed verl, or with None the whole
    package, under `root`, apply the patch with `patch -p1`, dry run then for real; fail if either does not
    apply cleanly. Returns `root` (with None, a directory to put first on PYTHONPATH)."""
    assert shutil.which("patch"), "the `patch` program is needed to check patches/ (Debian package: patch)"
    if files is None:
        shutil.copytree(INSTALLED_VERL, root / "verl", ignore=shutil.ignore_patterns("__pycache__"))
    for relative in files or []:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(INSTALLED_VERL.parent / relative, root / relative)
    for extra in (["--dry-run"], []):
        result = subprocess.run(
            ["patch", "-p1", "--forward", *extra, "-i", str(PATCHES / patch_name)],
            cwd=root, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return root
