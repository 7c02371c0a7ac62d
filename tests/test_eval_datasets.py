"""Dataset loaders: format detection, field mapping, and errors that name the record and field."""
import pytest

from eval_helpers import CF_FLAT, CF_ROME, HALLU, KNOWEDIT, TEMPORAL, ZSRE, write_json
from memoir.eval.datasets import EditRecord, detect_format, load_records


@pytest.mark.parametrize("record,fmt", [
    (ZSRE, "zsre"), (KNOWEDIT, "knowedit"), (HALLU, "hallucination"), (TEMPORAL, "temporal"),
    (CF_ROME, "counterfact_rome"), (CF_FLAT, "counterfact_flat"),
])
def test_loaders_auto_and_explicit(tmp_path, record, fmt):
    p = write_json(tmp_path, "d.json", [record, record])
    recs, got = load_records(p)
    assert got == fmt and len(recs) == 2 and detect_format(record) == fmt
    explicit = "counterfact" if fmt.startswith("counterfact") else fmt
    assert load_records(p, explicit)[1] == fmt
    r = recs[0]
    assert isinstance(r, EditRecord) and r.prompt.strip() and r.target.strip()
    assert r.loc_prompt and r.loc_answer
    assert (r.rephrase is None) == (fmt == "hallucination")


def test_loader_field_mapping(tmp_path):
    r = load_records(write_json(tmp_path, "k.json", [KNOWEDIT]))[0][0]
    assert (r.prompt, r.target, r.loc_answer) == (KNOWEDIT["prompt"], "male", "forward strand")
    r = load_records(write_json(tmp_path, "c.json", [CF_ROME]))[0][0]
    assert (r.prompt, r.target, r.rephrase) == ("Spike Hughes originates from", "Philadelphia", "Spike Hughes is native to")
    assert (r.loc_prompt, r.loc_answer) == ("Max Mosley originates from", "London")
    assert r.extra["case_id"] == 7
    r = load_records(write_json(tmp_path, "z.json", [ZSRE]), limit=1)[0][0]
    assert (r.prompt, r.target, r.rephrase, r.loc_answer) == (ZSRE["src"], ZSRE["alt"], ZSRE["rephrase"], "Hugo Weaving")


def test_empty_locality_answer_is_skipped(tmp_path):
    bad = dict(HALLU, locality_ground_truth="")
    recs, _ = load_records(write_json(tmp_path, "h.json", [HALLU, bad]))
    assert recs[0].loc_prompt is not None
    assert recs[1].loc_prompt is None and recs[1].loc_answer is None and "loc_skipped" in recs[1].extra


@pytest.mark.parametrize("mutate,fmt,field", [
    (lambda r: r.pop("alt"), "zsre", "alt"),
    (lambda r: r.update(rephrase=""), "zsre", "rephrase"),
    (lambda r: r.update(src=3), "zsre", "src"),
    (lambda r: r.update(locality={"Relation_Specificity": []}), "knowedit", "locality.Relation_Specificity"),
    (lambda r: r.pop("target_new"), "hallucination", "target_new"),
    (lambda r: r.pop("ood_rephrase"), "temporal", "ood_rephrase"),
    (lambda r: r["requested_rewrite"].update(prompt="no placeholder"), "counterfact", "requested_rewrite.prompt"),
    (lambda r: r.update(neighborhood_prompts=[]), "counterfact", "neighborhood_prompts"),
])
def test_malformed_record_names_index_and_field(tmp_path, mutate, fmt, field):
    import copy

    base = {"zsre": ZSRE, "knowedit": KNOWEDIT, "hallucination": HALLU, "temporal": TEMPORAL, "counterfact": CF_ROME}[fmt]
    bad = copy.deepcopy(base)
    mutate(bad)
    p = write_json(tmp_path, "bad.json", [base, base, bad])
    with pytest.raises(ValueError, match=rf"record 2: field '{field}'"):
        load_records(p, fmt)


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(tmp_path / "x.json")
    with pytest.raises(ValueError, match="record 0: unrecognised record fields"):
        load_records(write_json(tmp_path, "u.json", [{"question": "q"}]))
    with pytest.raises(ValueError, match="record 1: expected a JSON object"):
        load_records(write_json(tmp_path, "l.json", [ZSRE, ["not", "a", "dict"]]), "zsre")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(write_json(tmp_path, "z.json", [ZSRE]), "squad")
