import pytest

pytestmark = pytest.mark.slow


def test_demo_training_clearly_improves_retrieval(trained_demo):
    before, after = trained_demo["before"]["r_mean"], trained_demo["after"]["r_mean"]
    # before is chance level (~4-5 mR on 100 images x 500 captions); 300 steps reach ~15-20
    assert before < 8
    assert after >= 2 * before and after >= before + 6, (before, after)


def test_demo_command_line_prints_both_tables(tmp_path, capsys):
    from harma_fast.cli import main
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "test retrieval before training" in out and "test retrieval after training" in out
    assert out.count("| R@1 (i→t) |") >= 3 and "harma-fast export" in out
