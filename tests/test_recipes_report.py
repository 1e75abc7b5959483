"""tools/recipes_report.py: ``--reuse`` only tests a finished fit trained with the same ``--set`` values."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import recipes_report  # noqa: E402


def _finished(root: Path, trained: list[str] | None) -> None:
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"")
    if trained is not None:
        (root / "report_set.json").write_text(json.dumps(trained))


@pytest.mark.parametrize(("trained", "asked", "said"), [
    (None, ["--model.x", "1"], "trained with --set (none), not model.x=1"),
    (["--model.x", "1"], [], "trained with --set model.x=1, not (none)"),
    (["--model.x", "1"], ["--model.x", "2"], "trained with --set model.x=1, not model.x=2"),
])
def test_reuse_refuses_a_fit_trained_with_other_set_values(tmp_path, monkeypatch, trained, asked, said):
    monkeypatch.setattr(recipes_report, "REPO", tmp_path)
    _finished(tmp_path / "runs" / "report" / "sort_of_clevr_fast" / "seed1", trained)
    with pytest.raises(SystemExit, match=re.escape(said)):
        recipes_report.run("sort_of_clevr_fast", recipes_report.RUNS["sort_of_clevr_fast"], None, reuse=True, seed=1,
                           overrides=tuple(asked))
