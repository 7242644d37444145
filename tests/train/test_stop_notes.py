"""hvpmtl/train/stop_notes.py: a rank that stops on an input error leaves its reason for its peers (exit 2 for all),
a rank that stops on a bug or dies leaves none (its peers exit 5, naming it)."""
import errno

from hvpmtl.config import ConfigError
from hvpmtl.data.formats.issues import DataError
from hvpmtl.train.exit_codes import EXIT_CONFIG, EXIT_PEER_LOST
from hvpmtl.train.stop_notes import clear_stop_note, exit_for_lost_peer, stop_note_path, write_stop_note


def test_an_input_error_is_noted_and_the_peer_exits_2_with_it(tmp_path, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt/mp_rank_00_model_states.pt"))
    write_stop_note(tmp_path, 0, full)
    note = stop_note_path(tmp_path, 0).read_text()
    assert note.startswith("rank 0 stopped on an input error:") and "mp_rank_00_model_states.pt" in note, note
    assert exit_for_lost_peer(tmp_path, 2, 1, "[hvpmtl] rank 1", 7, "rank 0", RuntimeError("gloo")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "rank 1: stopping at step 7 (exit 2) because rank 0 stopped on an input error" in err, err
    for e, said in ((DataError("train.txt:43: truncated image"), "data error: train.txt:43"),
                    (ConfigError("optim.lr: not a number"), "config error: optim.lr")):
        write_stop_note(tmp_path, 0, e)
        assert said in stop_note_path(tmp_path, 0).read_text()


def test_a_bug_or_a_dead_rank_leaves_no_note_and_the_peer_exits_5(tmp_path, capsys):
    write_stop_note(tmp_path, 0, KeyError("a bug"))
    assert not stop_note_path(tmp_path, 0).exists()
    assert exit_for_lost_peer(tmp_path, 2, 1, "[hvpmtl] rank 1", 3, "rank 0 (no heartbeat)",
                              RuntimeError("Connection closed by peer")) == EXIT_PEER_LOST
    assert "a collective failed at step 3: rank 0 (no heartbeat)" in capsys.readouterr().err
    write_stop_note(tmp_path, 0, DataError("x"))
    clear_stop_note(tmp_path, 0)  # a restarted rank's start: the previous process's note is not its own
    assert not stop_note_path(tmp_path, 0).exists()
