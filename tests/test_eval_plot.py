"""Plot grouping: run labels and per-age profiles."""
import pytest


def test_plot_series_separates_variants_of_one_method():
    from memoir.eval.plot import series

    def result(n, source, config, method="memoir", rel=0.9):
        return {"method": method, "n_edits": n, "data": "d/zsre.json", "config_source": source,
                "config": config, "rel": rel, "_path": f"{method}_{n}.json"}

    runs = [result(10, "preset:smollm2", {"k": 1}), result(100, "preset:smollm2", {"k": 1}),
            result(10, "cfg/energy90.yaml", {"k": 2}),
            # the preset changed between runs: same label, different config -> two lines
            result(732, "preset:smollm2", {"k": 3}),
            result(10, "preset:smollm2", {"lr": 1}, method="ft"), result(100, "default", {"lr": 1}, method="ft")]
    data = series(runs)
    labels = sorted(label for label, _ in data)
    assert "memoir (energy90)" in labels and "ft" in labels
    preset_lines = [k for k in data if k[0].startswith("memoir (preset smollm2) #")]
    assert len(preset_lines) == 2
    assert sorted(len(data[k]) for k in preset_lines) == [1, 2]
    assert [n for n, _ in data[("ft", "zsre")]] == [10, 100]  # the MEMOIR preset name does not split a baseline
    # one config reached under two names: one line (labelled by the first run)
    same = series([result(50, "cfg/other.yaml", {"k": 4}), result(600, "preset:smollm2", {"k": 4})])
    assert len(same) == 1 and len(next(iter(same.values()))) == 2


def test_age_profile_averages_records_by_edit_position():
    from memoir.eval.plot import age_profile

    records = [{"rel": 0.0, "gen": 1.0, "loc": 1.0}, {"rel": 1.0, "gen": None, "loc": 1.0},
               {"rel": 0.5, "gen": 0.5, "loc": 0.0, "rel_ppl": 4.0}]
    prof = age_profile({"records": records}, 2)
    assert [x for x, _ in prof] == [0.5, 2.0]  # middle position of each block, oldest first
    first, last = prof[0][1], prof[1][1]
    assert first["rel"] == 0.5 and first["gen"] == 1.0 and first["loc"] == 1.0 and first["rel_ppl"] is None
    assert first["mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert last["rel_ppl"] == 4.0 and last["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no per-edit records"):
        age_profile({"records": []}, 2)
    with pytest.raises(ValueError, match="block"):
        age_profile({"records": records}, 0)
