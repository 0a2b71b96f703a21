"""The user tools over a job's output or spec.

status.py        `factory status`
preview.py       `factory preview`: a contact sheet
report.py        `factory report`: one HTML page (plots in report_plots.py, bounded summaries in streamstats.py)
top_fraction.py  `factory select`: the best fraction by one score
captions.py      `factory captions`: captions as JSON lines for training specs
pool_sizes.py    `factory plan-resources`: balanced GPU pools from stage rates
"""
