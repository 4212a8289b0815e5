"""Did the fine-tune work? Generation-based scoring of base and adapters on held-out prompts (metrics.py,
answers.py, compare.py), a self-contained HTML report (report.py) and lm-evaluation-harness tasks (harness.py)."""
