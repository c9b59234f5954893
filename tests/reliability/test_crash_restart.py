"""Issue 12 at CI size: `mend serve` with its embedded redis-server comes back by itself after a crash."""

from __future__ import annotations

import pytest
from scenarios import crash_restart

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return crash_restart.tiny_model_dir(tmp_path_factory.mktemp("model"))


def test_kill_9_of_the_service_group_then_restart_five_times_keeps_every_edit(tmp_path, model_dir):
    figures = crash_restart.run_kill_restart(crash_restart.CI["cycles"], tmp_path, model_dir)
    assert not figures["problems"], figures
    assert figures["restart_to_ready"]["n"] == crash_restart.CI["cycles"] == figures["edits"]
    assert figures["old_redis_exit_after_kill"]["n"] == crash_restart.CI["cycles"]  # died with its service


def test_kill_9_of_the_embedded_redis_is_reported_then_the_service_exits_1_and_a_restart_recovers(tmp_path,
                                                                                                 model_dir):
    figures = crash_restart.run_redis_killed(tmp_path, model_dir)
    assert not figures["problems"], figures


def test_a_leftover_redis_server_of_this_dir_is_shut_down_cleanly_and_the_journal_kept(tmp_path, model_dir):
    figures = crash_restart.run_leftover_redis(tmp_path, model_dir)
    assert not figures["problems"], figures


def test_a_pid_file_naming_an_unrelated_process_leaves_it_untouched_and_starts(tmp_path, model_dir):
    figures = crash_restart.run_unrelated_pid(tmp_path, model_dir)
    assert not figures["problems"], figures


def test_a_pid_file_naming_another_dirs_redis_is_refused_with_exit_1(tmp_path, model_dir):
    figures = crash_restart.run_foreign_redis(tmp_path, model_dir)
    assert not figures["problems"], figures


def test_a_busy_port_exits_1_with_the_reason(tmp_path, model_dir):
    figures = crash_restart.run_port_in_use(tmp_path, model_dir)
    assert not figures["problems"], figures
