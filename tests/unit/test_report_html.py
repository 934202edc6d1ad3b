"""report.html from a report.json: charts drawn from the figures, nothing fetched, nothing run."""

import html.parser

from bootfinetune.run.report_html import _nice_ticks, render_report


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


REPORT = {
    "metric": {"before": 0.0, "after": 0.9, "teacher": 0.95, "examples": 20},
    "stages": {"bootstrap": {"examples": 40, "kept": 36, "failed": 1, "teacher_calls": 80, "seconds": 3.0},
               "data": {"seconds": 0.1},
               "finetune": {"seconds": 12.0,
                            "all": {"train_loss": [2.0, 0.5], "eval_loss": [1.0, 0.4], "eval_loss_before": 6.5,
                                    "best_epoch": 2, "steps_per_epoch": 10, "tokens": 1000, "seconds": 10.0,
                                    "loss_curve": [[1, 6.0], [10, 1.0], [20, 0.4]]}},
               "evaluate": {"seconds": 2.0}},
}


def test_ticks_cover_the_highest_value():
    assert _nice_ticks(0, 6.5)[-1] >= 6.5 and _nice_ticks(0, 6.5)[0] == 0
    assert _nice_ticks(0, 0.3) == [0.0, 0.1, 0.2, 0.3]


def test_report_page_draws_metric_bars_and_loss_curves():
    page = render_report(REPORT, title="run <x>")
    parsed = _Collect()
    parsed.feed(page)
    tags = [t for t, _ in parsed.tags]
    assert tags.count("svg") == 2 and "script" not in tags and "link" not in tags
    bars = [a for t, a in parsed.tags if t == "rect" and a.get("fill", "").startswith("#") and float(a["height"]) > 4]
    heights = sorted(float(a["height"]) for a in bars)
    assert len(heights) == 2 and abs(heights[1] / heights[0] - 0.95 / 0.9) < 0.01  # after and teacher, to scale
    paths = [a for t, a in parsed.tags if t == "path"]
    assert len(paths) == 2 and any("stroke-dasharray" in a for a in paths)  # train curve and dashed eval
    text = " ".join(parsed.text)
    assert "run <x>" in text and "0.900" in text and "0.950" in text and "36" in text


def test_losses_spanning_decades_get_a_log_axis():
    from bootfinetune.run.report_html import line_chart

    steep = line_chart([{"name": "train", "points": [(0, 6.9), (50, 0.2), (100, 0.001)]}], title="t",
                       x_label="step", y_label="loss")
    assert "loss (log scale)" in steep and ">0.001<" in steep and ">10<" in steep
    flat = line_chart([{"name": "train", "points": [(0, 2.0), (100, 1.0)]}], title="t", x_label="step",
                      y_label="loss")
    assert "log scale" not in flat


def test_report_page_and_demo_table_show_teacher_tokens_and_cost():
    from bootfinetune.entrypoints.demo import summary_rows

    priced = {**REPORT, "stages": {**REPORT["stages"], "bootstrap": {
        **REPORT["stages"]["bootstrap"],
        "usage": {"openai/gpt-4o-mini": {"calls": 80, "prompt_tokens": 9000, "completion_tokens": 700, "cost_usd": 0.0018}},
        "val": {"usage": {"openai/gpt-4o-mini": {"calls": 20, "prompt_tokens": 1000, "completion_tokens": 300,
                                                 "cost_usd": 0.0004}}}}}}
    parsed = _Collect()
    parsed.feed(render_report(priced, title="run"))
    assert "11000 tokens (10000 prompt, 1000 completion), $0.0022" in parsed.text
    unpriced = {**priced, "stages": {**priced["stages"], "bootstrap": {
        **priced["stages"]["bootstrap"],
        "usage": {"openai/scripted": {"calls": 80, "prompt_tokens": 9000, "completion_tokens": 700, "cost_usd": None}}}}}
    row = dict(summary_rows(unpriced, 1.0))["teacher tokens"]
    assert row.endswith("cost unknown (no price for openai/scripted)") and row.startswith("11000 tokens")
    assert dict(summary_rows(REPORT, 1.0))["teacher tokens"] == "n/a (not recorded)"


def test_report_page_and_demo_table_show_the_students_tokens_while_scoring():
    from bootfinetune.entrypoints.demo import summary_rows

    scored = {**REPORT, "stages": {**REPORT["stages"], "evaluate": {"seconds": 2.0, "usage": {
        "before": {"openai/student": {"calls": 40, "prompt_tokens": 4000, "completion_tokens": 640, "cost_usd": None}},
        "after": {"openai/student": {"calls": 40, "prompt_tokens": 4000, "completion_tokens": 200, "cost_usd": None}}}}}}
    parsed = _Collect()
    parsed.feed(render_report(scored, title="run"))
    expected = "before 4640 (4000 prompt, 640 completion), after 4200 (4000 prompt, 200 completion)"
    assert expected in parsed.text
    assert dict(summary_rows(scored, 1.0))["student tokens (scoring)"] == expected
    assert dict(summary_rows(REPORT, 1.0))["student tokens (scoring)"] == "n/a (not evaluated)"
