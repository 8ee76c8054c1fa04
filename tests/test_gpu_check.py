"""benchmarks/gpu_check.sh on CPU: its syntax (bash -n, shellcheck), its arguments, and its dry run
end to end (the same measuring code as on a GPU at tiny sizes, the section written to a file of
ours and never to BENCHMARKS.md); and gpu_check.py's datasheet table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_tpu_scripts import shellcheck_binary

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.sh"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402  (benchmarks/ is no package)


def run_script(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_script_syntax_shellcheck_and_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    binary = shellcheck_binary()
    if binary is not None:
        result = subprocess.run([binary, str(SCRIPT)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    assert os.access(SCRIPT, os.X_OK)
    helped = run_script("--help")
    assert helped.returncode == 0 and "--dry-run" in helped.stdout
    refused = run_script("--bogus")
    assert refused.returncode == 2 and "unknown argument --bogus" in refused.stderr


def test_dry_run_writes_every_figure_to_its_file_not_benchmarks_md(tmp_path):
    benchmarks_md = (BENCHMARKS / "BENCHMARKS.md").read_bytes()
    out = tmp_path / "section.md"
    result = run_script("--out", str(out), DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (BENCHMARKS / "BENCHMARKS.md").read_bytes() == benchmarks_md
    text = out.read_text()
    section = text[text.index("<!-- gpu_check: begin -->"):text.index("<!-- gpu_check: end -->")]
    assert "## GPU check: ~1B Llama in bfloat16 (cpu, dry run at tiny sizes)" in section
    number = r"[\d,.]+"
    for row in (rf"\| train step, dot_product \(XLA, no cuDNN\) \| {number} tokens/s .*MFU n/a of the datasheet "
                rf"peak \| MFU {number}% of the measured matmul peak \|",
                rf"\| train step, reference \(einsum\) \| {number} tokens/s",
                rf"\| attention: dot_product / reference train step \| {number}x \|",
                rf"\| decode, batch 4 \| {number} tokens/s .* HBM roofline n/a .*\(measured bandwidth\): {number}% \|",
                rf"\| left padding: dot_product vs reference logits, 4 rows x 40 \| max difference {number} of the "
                r"largest logit \(bound 0.1\) \| cuDNN kernel in the program: no \|"):
        assert re.search(row, section), row
    assert "Tests on this machine before the figures: not run (dry run)" in section
    assert "Command: `bash benchmarks/gpu_check.sh --dry-run`" in section


@pytest.mark.parametrize("device_kind, expected", [
    ("NVIDIA H200", (989e12, 4.8e12)), ("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)),
    ("NVIDIA H100 PCIe", (756e12, 2.0e12)), ("NVIDIA L40S", (362e12, 0.864e12)), ("NVIDIA L4", (121e12, 0.3e12)),
    ("cpu", (None, None)), ("NVIDIA GeForce RTX 4090", (None, None))])
def test_datasheet_matches_the_most_specific_name(device_kind, expected):
    assert gpu_check.datasheet(device_kind) == expected
