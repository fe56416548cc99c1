"""benchmarks/chaos.py's own logic, without running squall: its markdown writer keeps the
hand-written reading notes (and the sections it did not rerun) across reruns, and its verdicts
come from the numbers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import chaos  # noqa: E402


def block(key: str, verdict: bool, summary: str, body: str) -> str:
    result = chaos.SectionResult(key, verdict, summary, [body])
    return chaos.section_block(result, "python -m benchmarks.chaos", "2026-01-01 00:00", 60.0)


def test_reruns_keep_the_reading_notes_and_the_sections_not_rerun(tmp_path):
    out = tmp_path / "chaos.md"
    chaos.write_markdown(out, ["header one"], {"storm": block("storm", True, "60 pre", "S1")})
    text = out.read_text()
    assert text.startswith(chaos.TITLE) and chaos.NOTES_HEADING in text
    assert text.index(chaos.GEN_END) < text.index(chaos.NOTES_HEADING)
    assert "Not run yet." in text  # the three other sections

    notes = f"{chaos.NOTES_HEADING}\n\nThe storm mostly ran on one worker.\n\n### More\n\nx\n"
    out.write_text(text[:text.index(chaos.NOTES_HEADING)] + notes)
    chaos.write_markdown(out, ["header two"], {"grid": block("grid", False, "3/4 exit 0", "G1")})
    chaos.write_markdown(out, ["header three"], {"storm": block("storm", False, "9 pre", "S2")})
    text = out.read_text()
    assert text.endswith(notes)  # untouched, however often the script runs
    assert "header three" in text and "header two" not in text
    assert "S2" in text and "S1" not in text and "G1" in text  # grid kept from the 2nd run
    rows = {r[0]: r[1:] for r in chaos.verdict_rows(chaos.split_markdown(text)[0])}
    assert rows["1. Preemption storm"] == ["**not met**", "9 pre"]
    assert rows["4. Every attack x every rule under heavy preemption"] == ["**not met**",
                                                                           "3/4 exit 0"]
    assert rows["2. SIGKILL and resume"] == ["not run", ""]


def test_a_hand_written_file_without_markers_is_kept_as_notes(tmp_path):
    out = tmp_path / "chaos.md"
    out.write_text("Some notes a person wrote first.\n")
    chaos.write_markdown(out, ["h"], {})
    text = out.read_text()
    assert text.endswith(f"{chaos.NOTES_HEADING}\n\nSome notes a person wrote first.\n")
    assert text.count(chaos.GEN_START) == 1


def test_storm_verdict_from_the_numbers():
    assert chaos.storm_verdict(50, 0.95, 0.97, target=50)
    assert chaos.storm_verdict(80, 0.99, 0.97, target=50)
    assert not chaos.storm_verdict(49, 0.97, 0.97, target=50)  # too few preemptions
    assert not chaos.storm_verdict(60, 0.9499, 0.97, target=50)  # 2.01 points off
    assert not chaos.storm_verdict(60, 0.97, 0.97, target=50, finished=False)
    assert not chaos.storm_verdict(60, float("nan"), 0.97, target=50)


def test_sigkill_verdict_and_kill_points():
    assert chaos.sigkill_verdict([True] * 4, completed=True)
    assert not chaos.sigkill_verdict([True, False], completed=True)
    assert not chaos.sigkill_verdict([], completed=True)  # nothing compared
    assert not chaos.sigkill_verdict([True], completed=False)
    points = chaos.kill_points(20, 150, seed=7)
    assert points == chaos.kill_points(20, 150, seed=7) == sorted(set(points))
    assert len(points) == 20 and 2 <= points[0] and points[-1] <= 148


def test_a_bad_invocation_passes_only_when_everything_holds():
    good = dict(rc=2, stdout="", stderr="squall: error: workers=0: must be >= 1\n",
                mentions="workers", created=[], leftovers=0, ray_used=False)
    assert chaos.invocation_problems(**good) == []
    for change, problem in [
        ({"rc": 1}, "exit 1"), ({"rc": None}, "killed after the timeout"),
        ({"stderr": "squall: note: x\nsquall: error: y\n"}, "2 stderr lines"),
        ({"stderr": "Traceback (most recent call last):\n"}, "traceback"),
        ({"stderr": "error: workers=0\n"}, "no `squall: error:` line first"),
        ({"mentions": "steps"}, "message does not name `steps`"),
        ({"stdout": "hello"}, "printed on stdout"), ({"created": ["runs"]}, "created runs"),
        ({"leftovers": 2}, "2 processes left running"),
        ({"ray_used": True}, "Ray started (RAY_TMPDIR not empty)"),
    ]:
        assert problem in chaos.invocation_problems(**{**good, **change}), change


def test_the_malformed_section_is_met_only_when_every_case_passes():
    cases = chaos.CASES[:3]
    passing = [chaos.Outcome(c, " ".join(c.args), "squall: error: x", []) for c in cases]
    assert chaos.malformed_report(passing).verdict
    failing = [*passing[:2], chaos.Outcome(cases[2], "c", "Traceback", ["traceback"])]
    result = chaos.malformed_report(failing)
    assert not result.verdict and result.summary == "2/3 invocations pass"
    assert len({c.args for c in chaos.CASES}) == len(chaos.CASES) >= 50  # distinct


def test_the_grid_is_met_only_when_every_run_exits_0():
    summary = {"skipped_steps": 3, "preemptions": 2, "joins": 1, "rejected_updates": 0}
    cells = [chaos.GridCell("mean", "alie", [], 0, 1.0, summary, "", 0),
             chaos.GridCell("mean", "nan", [], 0, 1.0, summary, "", 0)]
    settings = chaos.QUICK
    assert chaos.grid_report(settings, Path("/t"), ["mean"], ["alie", "nan"], cells).verdict
    cells[1] = chaos.GridCell("mean", "nan", ["strategy=mean"], 1, 1.0, None, "ValueError: x", 0)
    result = chaos.grid_report(settings, Path("/t"), ["mean"], ["alie", "nan"], cells)
    assert not result.verdict and result.summary == "1/2 runs exit 0"
    assert any("ValueError: x" in line for line in result.lines)


def test_steps_redone_are_counted_per_attempt():
    """Killed at 12 (checkpoint 10), at 15 before writing the one of step 15 (so the next
    attempt starts from 10 again), at 16 after it; the final run starts from 15."""
    kills = [chaos.Kill(11, 12, 0), chaos.Kill(14, 15, 10), chaos.Kill(16, 16, 10)]
    rows, redone = chaos.attempts_table(kills, final_from=15, final_steps=20)
    assert [r[4] for r in rows] == ["0", "2", "5", "1"] and redone == 8
    assert [r[5] for r in rows] == ["yes", "no", "yes", "-"]
    assert rows[-1][:4] == ["final", "-", "15", "20"]
