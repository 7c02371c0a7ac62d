"""The Triton kernels live in the top-level ``kernels/`` folder and install as ``memoir.kernels``,
both in the editable install the test suite runs on and in a built wheel."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

import memoir
import memoir.kernels

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.py"))


def test_kernels_folder_holds_the_kernel_modules():
    assert "_triton_kernels.py" in KERNEL_FILES and "__init__.py" in KERNEL_FILES
    assert not (REPO / "memoir" / "kernels").exists()


def test_editable_install_imports_kernels_from_the_top_level_folder():
    if pathlib.Path(memoir.__file__).resolve().parent != REPO / "memoir":
        pytest.skip("memoir is not imported from this checkout")
    assert pathlib.Path(memoir.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


@pytest.mark.timeout(600)
def test_wheel_ships_kernels_as_memoir_kernels(tmp_path):
    env = dict(os.environ, MEMOIR_SKIP_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True, env=env, cwd=tmp_path, timeout=540,
    )
    (wheel,) = tmp_path.glob("memoir_edit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert {f"memoir/kernels/{f}" for f in KERNEL_FILES} <= names
    assert not any(n.startswith("kernels/") for n in names)
    assert "memoir/presets/smollm2.yaml" in names and "memoir/data/background.txt" in names
    # Import from the unpacked wheel (first on the path), not from this checkout.
    out = subprocess.run(
        [sys.executable, "-c", "import memoir.kernels as k; print(k.__file__); print(k.tophash.__module__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), timeout=120,
    ).stdout.split()
    assert pathlib.Path(out[0]).resolve() == (tmp_path / "site" / "memoir" / "kernels" / "__init__.py").resolve()
    assert out[1] == "memoir.kernels._tophash"


def test_checkout_root_on_path_does_not_shadow_the_hf_kernels_package():
    # transformers imports the Hugging Face ``kernels`` package when it is installed (recent
    # versions depend on it) and probes for it otherwise; from a checkout's root the name
    # ``kernels`` first finds this folder, which must hand the import to that package or, without
    # it, import cleanly and pull in nothing (not even memoir, which a plain clone may lack).
    code = (
        "import sys, importlib.util, kernels; "
        "assert not any(m == 'memoir' or m.startswith('memoir.') for m in sys.modules), sorted(sys.modules); "
        "import transformers, transformers.activations; "
        "from transformers.utils.import_utils import is_kernels_available; "
        "print(kernels.__file__, is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120, capture_output=True,
                         text=True).stdout.split()
    assert pathlib.Path(out[0]).resolve() != REPO / "kernels" / "__init__.py" or out[1] == "False", out
    if out[1] == "True":  # the Hugging Face package is installed: the import reached it
        assert "site-packages" in out[0] or "dist-packages" in out[0], out


def test_checkout_root_without_the_hf_kernels_package_exposes_nothing(tmp_path):
    # Only the checkout's own folder on the path (site-packages hidden): nothing to hand over to.
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'packages' not in p]; "
            "import kernels; assert kernels.__all__ == [] and not hasattr(kernels, 'tophash'), dir(kernels); "
            "print(kernels.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=REPO, timeout=120, capture_output=True,
                         text=True).stdout.strip()
    assert pathlib.Path(out).resolve() == REPO / "kernels" / "__init__.py"
