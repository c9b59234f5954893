"""`mend stats` end to end on a tiny llama saved to a directory: statistics and config written, bad
arguments refused with a clear message and status 2."""

from __future__ import annotations

import json

import pytest

from editor_core.methods.locate import CONFIG_FILE, LocateConfig
from editor_core.stats import STATS_FILE, KeyStats, stats_fingerprint
from service.cli import main


def test_stats_from_sampled_and_counterfact_text(tiny_model_dir, tmp_path, facts, tiny_llama):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(facts))
    out = tmp_path / "stats"
    rc = main(["stats", "--model", str(tiny_model_dir), "--layers", "1", "2", "--data", str(data), "--samples", "8",
               "--tokens", "400", "--no-progress", "--out", str(out)])
    assert rc == 0
    stats = KeyStats.load(out / STATS_FILE)
    assert stats.layers == [1, 2] and stats.tokens >= 400
    assert "sampled" in stats.corpus and "CounterFact" in stats.corpus
    assert stats.fingerprint == stats_fingerprint(tiny_llama, [1, 2])
    cfg = LocateConfig.load(out)
    assert (out / CONFIG_FILE).is_file() and cfg.rome_layers == [2] and cfg.alphaedit_layers == [1, 2]
    # the value search's metric, at the layer values are read at (the last edited one), and a new config uses it
    assert sorted(stats.fisher) == [2] and stats.fisher[2].shape == (32, 32) and stats.fisher_tokens > 0
    assert cfg.value.metric == "fisher"


def test_a_config_already_there_keeps_its_metric_and_is_not_left_without_the_fisher(tiny_model_dir, tmp_path,
                                                                                      capsys):
    out = tmp_path / "stats"
    out.mkdir()
    LocateConfig(memit_layers=[1, 2], alphaedit_layers=[1, 2], rome_layers=[2]).save(out)  # euclidean values
    common = ["stats", "--model", str(tiny_model_dir), "--samples", "8", "--tokens", "100", "--no-progress",
              "--out", str(out)]
    assert main(common) == 0
    assert LocateConfig.load(out).value.metric == "euclidean" and KeyStats.load(out / STATS_FILE).fisher
    cfg = LocateConfig.load(out)
    cfg.value.metric = "fisher"
    cfg.save(out)
    before = (out / STATS_FILE).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--fisher-tokens", "0"])
    assert exit_info.value.code == 2 and "value.metric" in capsys.readouterr().err
    assert (out / STATS_FILE).read_bytes() == before  # refused before anything was written


def test_stats_without_the_fisher(tiny_model_dir, tmp_path):
    out = tmp_path / "stats"
    rc = main(["stats", "--model", str(tiny_model_dir), "--layers", "1", "2", "--samples", "8", "--tokens", "100",
               "--fisher-tokens", "0", "--no-progress", "--out", str(out)])
    assert rc == 0 and KeyStats.load(out / STATS_FILE).fisher == {}


@pytest.mark.parametrize(("argv", "message"), [
    (["--corpus", "counterfact"], "needs --data"),
    (["--data", "/nonexistent.json"], "no such file"),
    (["--layers", "9"], "--layers"),
    (["--fisher-tokens", "-1"], "--fisher-tokens"),
])
def test_stats_refuses_bad_arguments(tiny_model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"), "--no-progress", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s" / STATS_FILE).exists()
