"""core/progress.py: a bar only when asked for, on rank 0, and on a terminal; plain lines elsewhere."""
import io

from core.progress import progress_bar, show_progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_is_drawn_only_when_asked_on_rank_0_to_a_terminal(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    tty, pipe = _Terminal(), io.StringIO()
    assert show_progress(True, tty)
    assert not show_progress(False, tty)
    assert not show_progress(True, pipe)                  # a log file or a pipe: no bar
    monkeypatch.setenv("RANK", "1")
    assert not show_progress(True, tty)                   # other ranks: no bar
    monkeypatch.setenv("RANK", "0")
    assert show_progress(True, tty)


def test_progress_bar_draws_on_a_terminal_and_writes_plain_lines_elsewhere(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("COMAD_LOG_INTERVAL", raising=False)   # 30 s: only the last line here
    tty, pipe = _Terminal(), io.StringIO()
    assert list(progress_bar(range(3), desc="t", file=tty)) == [0, 1, 2]
    assert "3/3" in tty.getvalue() and "\r" in tty.getvalue()
    assert list(progress_bar(range(3), desc="p", file=pipe)) == [0, 1, 2]
    assert pipe.getvalue().startswith("p: it 3/3 (100%) ") and pipe.getvalue().count("\n") == 1
    assert "\r" not in pipe.getvalue() and "done in 0:00:00" in pipe.getvalue()
    bar = progress_bar(total=2, file=pipe, disable=True)   # the caller's own disable still holds
    assert bar.disable
    bar.update(2)
    bar.close()
    monkeypatch.setenv("RANK", "1")                        # other ranks: silent
    other = io.StringIO()
    assert list(progress_bar(range(3), desc="p", file=other)) == [0, 1, 2] and other.getvalue() == ""
    assert pipe.getvalue().count("\n") == 1
