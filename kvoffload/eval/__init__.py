"""Long-context accuracy and agreement with dense attention (``kvoffload eval``).

corpora.py (offline text and word lists), tasks.py (seeded task generators and RULER scoring),
metrics.py (perplexity, top-1 agreement, KL), runner.py (samples -> resumable JSONL),
report.py (table, JSON, plot).
"""
