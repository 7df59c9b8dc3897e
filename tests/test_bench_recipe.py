"""`fogsplit bench recipe`: each variant really exports, and the report says what each got."""
from __future__ import annotations

import json

import pytest

from fogsplit.bench.recipe import VARIANTS, main


@pytest.mark.slow
def test_two_variants_on_a_small_set_write_a_report(tmp_path, capsys):
    out = tmp_path / "recipe.json"
    assert main(["--datasets", "series", "--events", "240", "--variants", "recipe,before", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["datasets"]
    assert row["name"] == "series" and set(row["variants"]) == {"recipe", "before"}
    recipe, before = row["variants"]["recipe"], row["variants"]["before"]
    fit = row["train"] - round(0.15 * row["train"])             # the validation split is held out
    assert recipe["steps"] == 300 and before["steps"] == 8 * -(-fit // 64)
    for got in (recipe, before):
        assert 0 <= got["accuracy"] <= 1 and set(got["exit_accuracy"]) == {"local", "edge", "cloud"}
    assert "before" in capsys.readouterr().out


def test_an_unknown_variant_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--variants", "recipe,magic"])
    assert exit_.value.code == 2 and "magic" in capsys.readouterr().err
    assert "before" in VARIANTS
