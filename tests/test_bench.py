"""The benchmark scripts stay runnable, and their exactness check (our Trainer's per-step losses against a naive
full-logits implementation of the same objective) holds on the small smoke workload."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def check_rows(markdown: str) -> list[tuple[str, float, float]]:
    rows = re.findall(r"^\| (\w+) \| \d+ \| (-?[\d.]+) \| (-?[\d.]+) \| [\d.e+-]+ \|$", markdown, re.M)
    return [(objective, float(ours), float(naive)) for objective, ours, naive in rows]


@pytest.mark.parametrize("script, run, objectives", [
    ("bench_preference.py", "ours-dpo-lean", {"dpo"}),
    ("bench_sft.py", "ours-sft", {"ntp"}),
])
def test_benchmark_runs_and_matches_the_naive_objective(tmp_path, script, run, objectives):
    report = tmp_path / "report.md"
    done = run_script(script, "--small", "--quick", "--runs", run, "--markdown", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert f"| {run} |" in text
    rows = check_rows(text)
    assert {objective for objective, _, _ in rows} == objectives and len(rows) == 2
    for _, ours, naive in rows:
        assert ours == pytest.approx(naive, abs=1e-4)
    assert rows[0][1] != rows[1][1]  # the second step trained on updated weights


def test_profile_script_accounts_for_the_step():
    done = run_script("bench_profile.py", "--small", "--workload", "sft", "--warmup", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [int(s) for s in re.findall(r"^\| [^|]+ \| [\d.]+ \| (\d+)% \|$", done.stdout, re.M)]
    assert len(shares) == 7 and 90 <= sum(shares) <= 110, done.stdout


def test_atomic_json_write_replaces_whole_files_only(tmp_path):
    """The child reports (and the SFTMix score file) go through write_json_atomic: a dump that fails half way
    leaves the previous file intact and no temporary file."""
    import json

    from tunelab.trainers.files import write_json_atomic

    path = tmp_path / "sub" / "report.json"
    write_json_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"b": 2, "c": object()})  # "b" is written before "c" fails
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["report.json"]


def scaling_rows(markdown: str) -> dict:
    """{(run, documents, L): (real tokens per step, ratio to the smallest L)} of bench_scaling's table; rows that
    did not fit map to None."""
    out = {}
    for docs, length, run, rest in re.findall(r"^\| \w+ \| (\w+) \| (\d+) \| ([\w-]+) \| (.*)$", markdown, re.M):
        fit = re.match(r"(\d+) \| [\d.]+ \| \d+ \| ([\d.]+)x \| [\d.]+ \|$", rest)
        out[(run, docs, int(length))] = (int(fit[1]), float(fit[2])) if fit else None
    return out


@pytest.mark.slow
def test_scaling_benchmark_fills_rows_and_stops_what_does_not_fit(tmp_path):
    """One long example per step fills ~90% of each row length for both frameworks (the same rows, so the same
    real tokens), the first length is the ratio's base, and a child over the memory cap is reported, not run on."""
    report = tmp_path / "scaling.md"
    common = ("--small", "--lengths", "256,512", "--docs", "long", "--steps", "1", "--warmup", "0")
    done = run_script("bench_scaling.py", *common, "--runs", "ours-sft,trl-sft", "--markdown", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = scaling_rows(report.read_text())
    for length in (256, 512):
        ours, theirs = rows[("ours-sft", "long", length)], rows[("trl-sft", "long", length)]
        assert 0.75 * length <= ours[0] <= length
        assert abs(ours[0] - theirs[0]) <= 0.03 * length
    assert rows[("ours-sft", "long", 256)][1] == 1.0
    capped = run_script("bench_scaling.py", *common, "--runs", "ours-sft", "--memory-cap-gb", "0.05",
                        "--markdown", str(report))
    assert capped.returncode == 0, capped.stderr[-3000:]
    assert scaling_rows(report.read_text()) == {("ours-sft", "long", 256): None, ("ours-sft", "long", 512): None}
    assert len(re.findall(r"^\+ ", capped.stdout, re.M)) == 1  # 512 not tried once 256 did not fit
