"""AUTOTUNE: the tuner reads stage metrics and writes knobs (runtime/tunable.py), nothing else.

- budget.py   the CPU and RAM budgets a pass may use, from its options or the machine
- windows.py  measuring: what a stage did between two readings (rate, CPU share, waits)
- constants.py the rules' thresholds, windows and pacing, each with what was measured to set it
- policy.py   the rules: pure functions of windows -> a proposed move
- shrinking.py  the rules that take workers or buffer away (the same kind of function)
- experiments.py  the records (decisions, experiments) and the judging: keep or take back
- tuner.py    the loop: read windows, try one move at a time, have it judged, record
"""
