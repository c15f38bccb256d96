"""AUTOTUNE: the tuner reads stage metrics and writes knobs (runtime/tunable.py), nothing else.

- budget.py   the CPU and RAM budgets a pass may use, from its options or the machine
- windows.py  measuring: what a stage did between two readings (rate, CPU share, waits)
- policy.py   the rules and their thresholds: pure functions of windows -> a proposed move
- tuner.py    the loop: read windows, try one move at a time, judge it, keep or take back, record
"""
