"""``ds config check FILE [--world-size N]``: resolved JSON on stdout, one-line errors, exit status."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds.core.config.command import EXIT_INVALID, EXIT_OK, EXIT_USAGE, configure, run

CONFIGS = Path(__file__).parent / "configs"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds config")
    configure(parser)
    return parser.parse_args(argv)


def test_check_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    status = run(parse("check", str(CONFIGS / "bert_fp16_warmup.json"), "--world-size", "8"))

    out, err = capsys.readouterr()
    resolved = json.loads(out)
    assert status == EXIT_OK and err == ""
    assert (resolved["train_batch_size"], resolved["gradient_accumulation_steps"]) == (4096, 8)
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 1000
    assert resolved["fp16"]["hysteresis"] == 2 and resolved["communicator"]["backend"] == "torch"


def test_check_fails_with_a_one_line_message_and_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS / "inconsistent_batch.json"

    status = run(parse("check", str(path), "--world-size", "2"))

    out, err = capsys.readouterr()
    assert status == EXIT_INVALID and out == ""
    assert err == (f"error: {path}: train_batch_size 32 != train_micro_batch_size_per_gpu 4 * "
                   "gradient_accumulation_steps 2 * data-parallel size 2 = 16. Set train_batch_size to 16, change "
                   'the other two, or set one of the three to "auto" so ds computes it.\n')


def test_check_reports_old_spellings_as_warning_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("train_batch_size: 8\nbfloat16:\n  enabled: true\n")

    status = run(parse("check", str(path), "--world-size", "4"))

    out, err = capsys.readouterr()
    assert status == EXIT_OK
    assert json.loads(out)["bf16"]["enabled"] is True
    assert err.startswith("warning: config key 'bfloat16' is a deprecated spelling; ds read it as 'bf16'.")


def test_config_without_a_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse()) == EXIT_USAGE
    assert "usage: ds config check FILE [--world-size N]" in capsys.readouterr().err


def test_world_size_must_be_a_positive_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse("check", "x.json", "--world-size", "0")

    assert caught.value.code == EXIT_USAGE
    assert "must be at least 1, got 0" in capsys.readouterr().err


def _run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "ds.core.config", *argv], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_python_dash_m_checks_a_yaml_file() -> None:
    result = _run_module("check", str(CONFIGS / "llama_bf16_cosine.yaml"), "--world-size", "2")

    assert result.returncode == EXIT_OK, result.stderr
    resolved = json.loads(result.stdout)
    assert (resolved["train_batch_size"], resolved["optimizer"]["params"]["lr"]) == (64, 1e-5)


def test_python_dash_m_exits_non_zero_without_a_traceback() -> None:
    result = _run_module("check", str(CONFIGS / "hf_trainer_zero2.json"))

    assert result.returncode == EXIT_INVALID
    assert result.stdout == ""
    assert result.stderr == (f"error: {CONFIGS / 'hf_trainer_zero2.json'}: config key 'zero_optimization' needs "
                             'ds-zero, which is not installed. Fix: pip install "ds-core[zero]"\n')
