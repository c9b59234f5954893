import json

import pytest
from conftest import FIXTURES, SHARED_DATA

from editor_core.data import EditRecord, LocalityPair, load_records, split_records
from editor_core.requests import EditRequest

DATA = FIXTURES / "data"


def test_counterfact_auto_detected_and_parsed():
    recs = load_records(DATA / "cf_easyedit_small.json")
    assert [r.case_id for r in recs] == ["101", "102", "103"]
    r0 = recs[0]
    assert r0 == EditRecord(
        case_id="101", prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
        target_new="English", ground_truth="French", rephrases=("Danielle Darrieux grew up speaking",),
        locality=(LocalityPair("The mother tongue of Jean Gabin is", "French"),),
    )
    # list-valued rephrases and answers are accepted
    assert recs[1].rephrases == ("The maker of Apple A5 is", "Apple A5 was developed by")
    assert recs[1].locality == (LocalityPair("Apple II was created by", "Apple"),)


def test_counterfact_to_request():
    r = load_records(DATA / "cf_easyedit_small.json", limit=1)[0]
    assert r.to_request() == EditRequest(
        "The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux",
        ("Danielle Darrieux grew up speaking",),
    )


def test_zsre_jsonl_edit_is_src_to_alt_with_answers0_as_truth():
    recs = load_records(DATA / "zsre_small.jsonl")
    assert len(recs) == 2
    r = recs[1]
    assert r.prompt == "Which constellation is Delta Serpentis part of?"
    assert r.target_new == "Virgo"
    assert r.ground_truth == "Serpens"  # answers[0], not pred
    assert r.rephrases == ("What constellation does Delta Serpentis belong to?",)
    assert r.locality == (LocalityPair("nq question: who wrote the song killing me softly", "Charles Fox"),)
    assert r.case_id == "1"


def test_zsre_nq_prefix_can_be_stripped():
    r = load_records(DATA / "zsre_small.jsonl", format="zsre", strip_nq_prefix=True)[0]
    assert r.locality[0].prompt == "john goodman's character in the big lebowski"


def test_knowedit_lists_nested_groups_and_missing_truth():
    recs = load_records(DATA / "ke_format_small.json")
    r0, r1 = recs
    assert r0.ground_truth == "Beirut"
    assert r0.rephrases == ("Lyon is paired with the city of",)
    assert r0.locality == (
        LocalityPair("The twin city of Cairo is", "Baghdad"),
        LocalityPair("The twin city of Lyon's neighbour Turin is", "Lyon"),
        LocalityPair("Lyon is located in", "France"),
    )
    assert r1.target_new == "Hubble" and r1.ground_truth is None and r1.rephrases == ()
    assert r1.locality == (LocalityPair("Olympus Mons was discovered by", "Mariner 9"),)


def test_forced_format_and_limit():
    recs = load_records(DATA / "cf_easyedit_small.json", format="counterfact", limit=2)
    assert len(recs) == 2
    with pytest.raises(ValueError, match="missing keys.*'src'"):
        load_records(DATA / "cf_easyedit_small.json", format="zsre")
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(DATA / "cf_easyedit_small.json", format="csv")


def test_bad_file_names_file_record_and_keys():
    path = DATA / "bad_missing_keys.json"
    with pytest.raises(ValueError) as err:
        load_records(path)
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg
    assert "ground_truth" in msg and "locality_prompt" in msg


def test_a_record_with_nothing_to_edit_to_is_refused_or_left_out_when_asked(tmp_path, caplog):
    rows = [json.loads(line) for line in (DATA / "zsre_small.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["alt"] = ""  # as record 534 of the shared zsRE file: no alternative answer
    path = tmp_path / "zsre.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="record 0 has an empty prompt or target"):
        load_records(path)
    with caplog.at_level("WARNING"):
        kept = load_records(path, skip_empty=True)
    assert [r.case_id for r in kept] == ["1"]
    assert "left out 1 record(s)" in caplog.text and "[0]" in caplog.text


def test_unknown_layout_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format.*requested_rewrite"):
        load_records(DATA / "bad_unknown.json")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.json")
    garbage = tmp_path / "g.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_records(garbage)
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps([]))
    with pytest.raises(ValueError, match="no records"):
        load_records(empty)


def test_fixture_facts_load(facts):
    recs = load_records(FIXTURES / "facts.json")
    assert len(recs) == len(facts) == 16
    assert all(len(r.locality) == 1 and len(r.rephrases) == 1 for r in recs)


def test_split_is_deterministic_and_disjoint():
    recs = load_records(FIXTURES / "facts.json")
    tr1, va1 = split_records(recs, 0.25, seed=3)
    tr2, va2 = split_records(recs, 0.25, seed=3)
    assert (tr1, va1) == (tr2, va2)
    assert len(va1) == 4 and len(tr1) == 12
    assert {r.case_id for r in tr1}.isdisjoint({r.case_id for r in va1})
    assert {r.case_id for r in tr1 + va1} == {r.case_id for r in recs}
    _, va3 = split_records(recs, 0.25, seed=4)
    assert va3 != va1
    assert split_records(recs, 0.0) == (recs, [])
    with pytest.raises(ValueError):
        split_records(recs, 1.0)


@pytest.mark.skipif(not (SHARED_DATA / "zsre_mend_train-1k.json").is_file(), reason="shared data absent")
def test_shared_sets_load_when_present():
    cf = load_records(SHARED_DATA / "counterfact-val.json", limit=50)
    zs = load_records(SHARED_DATA / "zsre_mend_train-1k.json", limit=50)
    assert len(cf) == len(zs) == 50
    assert all(r.ground_truth and r.locality and r.rephrases for r in cf + zs)
