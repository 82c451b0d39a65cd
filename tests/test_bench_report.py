"""The benchmark report judges each op against what the GPU issue's target names."""
import pytest

from benchmarks.report import chart, main, markdown, speedups


def row(op, provider, ms, total=None, extra=None, **case):
    return {"op": op, "provider": provider, "median_ms": ms, "q1_ms": ms, "q3_ms": ms, "peak_mem_mb": total,
            "extra_mem_mb": extra, "device": "H100", "mode": "full", **case}


ROWS = ([row("encode", p, ms, tower="image", batch=1024) for p, ms in (("stock", 40.0), ("reference", 60.0),
                                                                      ("triton", 42.0))]
        + [row("recall", p, ms, queries=10000, gallery=100000) for p, ms in (("matmul", 10.0), ("reference", 90.0),
                                                                            ("triton", 16.0))]
        + [row("loss", p, ms, total, extra, batch=4096, dtype="bf16")
           for p, ms, total, extra in (("reference", 12.0, 900.0, 400.0), ("triton", 2.0, 520.0, 16.0))])


def test_each_op_is_judged_against_its_own_baseline():
    # encoding and recall were judged against the reference path ("reference" came first), so the
    # report never showed the ratios: adapted vs stock open_clip, ranks vs the bare GEMM
    ratios = {(r["op"], r["provider"]): (round(r["speedup"], 3), r["baseline"]) for r in speedups(ROWS)}
    assert ratios["encode", "triton"] == (round(40 / 42, 3), "stock")
    assert ratios["recall", "triton"] == (0.625, "matmul")
    assert ratios["loss", "triton"] == (6.0, "reference")


def test_memory_shows_the_total_peak_and_the_extra_against_the_baseline(tmp_path):
    text = markdown({}, ROWS)
    loss_triton = next(line for line in text.splitlines() if line.startswith("| loss") and "| triton |" in line)
    assert "| 520 | 16 (0.040x) | 6.00x reference |" in loss_triton  # the loss target: <= 1/20 of the extra
    chart(ROWS, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0


@pytest.mark.parametrize("content, why", [(None, "No such file or directory"), ("{", "Expecting property name"),
                                          ("{}", "holds no harma_fast benchmark records")])
def test_a_bad_results_file_is_one_error_line(tmp_path, capsys, content, why):
    # `python -m benchmarks.report nothere.json` ended in a FileNotFoundError traceback
    path = tmp_path / "RESULTS.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"python -m benchmarks.report: error: {path}: ") and why in err
