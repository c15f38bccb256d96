"""The tuner's measured constants: its thresholds, windows and pacing, each with what was
measured to set it. The rules (``policy.py``, ``shrinking.py``) and the loop (``tuner.py``,
``experiments.py``) read them from here.
"""

from __future__ import annotations

from feedline.runtime.tunable import (
    CHEAP_WORK_SECONDS,
    PURE_WAITING_SHARE,
    READ_AHEAD_MIN_GAP_SECONDS,
    READ_AHEAD_PULL_SECONDS,
    READ_AHEAD_WORTH_SHARE,
    SERVED_WAIT_SHARE,
)

FIRST_INTERVAL = 0.05
# A tuner settled (nothing changes) still looks every half second: a change of load waits at
# most this long to be seen, within the 2 s a user can tell.
MAX_INTERVAL = 0.5
MIN_WINDOW = 0.15  # a measuring window lasts at least this long ...
LATENCIES_PER_WINDOW = 3  # ... and this many per-element times of the stage under test ...
SETTLE_ELEMENTS = 8  # ... and sees this many elements move (at the root or one stage) ...
MAX_WINDOW = 2.0  # ... unless it has lasted this long: then it is judged on what it saw
STALL = 0.01  # the consumer stalls when it waits more than this fraction of the time
NO_STALL = SERVED_WAIT_SHARE  # ... and is served comfortably below this
STALL_RISE = 0.005  # a decrease that raises the stall by more than this is taken back
STALL_CUT = 0.7  # an increase that leaves less than this share of the stall is kept
# A decrease that makes a consumer already waiting much of the time wait this much more of
# it is taken back (smaller moves of a large wait are noise).
STALL_JUMP = 0.05
ALWAYS_WAITING = 0.9  # a consumer waiting more than this share of the time has no work of its own
GAIN = 0.08  # a change must raise the rate by this much to be worth its cost
LOSS = 0.03  # a decrease may cost at most this much rate
WAITING_WORK = 0.5  # CPU time / wall time below this: the work mostly waits (I/O) ...
WAITING_CORES = 0.3  # ... if all its workers together also use less than this many cores:
# threads waiting for the GIL show little CPU each too, but together they keep a core busy.
# Many threads that wait add up to more cores (each pays its hand-offs): they still wait when
# the work, run alone, waits too, until together they come near the one core the GIL allows.
MANY_WAITING_CORES = 0.7
PURE_WAITING = PURE_WAITING_SHARE  # CPU time / wall time below this: bigger steps
BUSY = 0.5  # workers spending this fraction of their time on their own work are "busy"
IDLE = 0.3  # ... and this fraction blocked on a full buffer, idle: fewer would do
# ... unless their consumer waited on the stage meanwhile, for at least this share of the
# window: the element it waits for, the oldest, holds the finished ones behind it in the
# buffer (in order, a slow call among fast ones). More calls in flight then fill the wait.
HELD_IN_ORDER = 0.15
CPU_FULL = 0.85  # the process uses this share of its CPU budget: the cores are taken
# Threads held by the GIL run Python one at a time: together they use about one core. Past
# this many, they already run in parallel enough that processes would mostly add hand-offs.
GIL_CORES = 1.5
# A process using less than this many cores leaves the GIL free a fifth of the time or more:
# its threads are not held by it.
GIL_FREE_CORES = 0.8
# Moving to processes needs at least this many idle cores on the machine to run them on (or
# half the cores the process leaves unused, if fewer).
FREE_CORES_FOR_PROCESSES = 0.5
# Fewer workers can keep the rate only if the cores the stage uses fit in them (a worker uses
# at most one): threads contending for the GIL, or waiting. Slack for measurement noise.
FEWER_SLACK = 0.15
# Work per element below which a hand-off between threads costs about as much as the work:
# such a stage, its workers idle while its consumer waits, goes inline in one step.
CHEAP_WORK = CHEAP_WORK_SECONDS
# CPU time per element above which moving a GIL-bound function to processes can pay for
# sending elements and results between processes (waiting does not move: only the CPU work).
PROCESS_WORTH = 100e-6
# Moving threads that already use most cores to processes costs memory (each worker loads
# what the function needs): it must raise the rate by this much to stay, above the noise of
# a busy machine (~10%). Image decoding gained 14-30% over a thread per core, round by round;
# numpy work that releases the GIL, +3% in one such comparison and +30% in one benchmark run.
PROCESS_GAIN = 0.15
# A thread per core that leaves more than this share of the cores unused (while its consumer
# waits on it) waits on the other threads: processes may run the same work in parallel. They
# can at best use the cores left, so with fewer unused the move could not gain PROCESS_GAIN.
# Two threads measured (with the batching and the consumer in the same process): Pillow image
# decoding used 1.15-1.82 of 2 cores, numpy work that releases the GIL 1.47-1.75; image
# decoding tried at 1.82 cores lost 21% in its trial, on top of what starting the workers cost.
THREADS_LEAVE_CORES = 1 - 1 / (1 + PROCESS_GAIN)
# A move to processes that did not pay is tried again only after this long, doubled at each
# further failure: a trial costs ~1 s of a slower pipeline (workers starting beside the threads,
# then the trial window), and a consumer changing speed says little about whether processes pay.
PROCESS_RETRY_SECONDS = 10.0
# Settle / measure windows, at least, of changes whose effect is slow to show (processes must
# start) or small next to the noise of short windows (reading ahead for a consumer that is
# mostly busy: its rate moves by about the fraction it waits).
LONG_WINDOW = 1.0
# A stage with nothing to compute (a prefetch) gains at most the consumer's own share of the
# time by reading ahead on a thread: below this share, the hand-offs cost more than that;
# and the consumer's own work between two elements must last at least OVERLAP_MIN_SECONDS.
OVERLAP_WORTH = READ_AHEAD_WORTH_SHARE
OVERLAP_MIN_SECONDS = READ_AHEAD_MIN_GAP_SECONDS
# A consumer waiting less than NO_STALL of its time still gains from a thread when each of its
# calls waits this long for an inline pull: more than a ready element's hand-off.
LONG_PULL = READ_AHEAD_PULL_SECONDS
# A verdict on a knob (more did not help; less cost rate) holds this long at first, doubled
# each time the same probe fails again, up to MAX_RETRY_SECONDS: a probe of a stable stage
# costs a window of lower rate (256 -> 192 threads on an I/O stage: 38-55% of the rate for
# it), so its cost shrinks over a long run, while a stage whose situation changed in a way
# no measurement shows is still tried again within a minute.
RETRY_SECONDS = 4.0
MAX_RETRY_SECONDS = 60.0
# A step up of at least this many workers that did not pay is tried again at once at half
# its size, and halved again while it fails: a rate that falls off a cliff past some count
# (GIL hand-offs: 20 ms waits ran at 6.3k elements/s on 128 threads, 9.4k on 192, 7.0k on
# 256) hides the gain below it, and the step back alone stops short of it for good.
NARROWED_STEP = 4
# ... except that a stage left inline while its work waits and its consumer waits on it is
# tried again within this long, whatever failed before: it is never left inline there.
INLINE_RETRY_SECONDS = 1.0
# ... and only while the stage's cost per element stays within this factor of what it was
# judged on (a map that turns I/O-bound: 5 us -> 2 ms). Threads contending for the GIL move
# a stage's wall time per element by up to about 2x from one window to the next.
COST_CHANGE = 3.0
# A scale-up of at least KNEE_STEP times the calls in flight that raised the rate less than
# KNEE_SHARE of that went past the knee; the calls are set back to the knee, with a margin.
KNEE_STEP = 4.0
KNEE_SHARE = 0.6
KNEE_MARGIN = 1.5
# A stage its consumer waited on within this many seconds keeps what it has, however idle it
# looks meanwhile: a read stalling 60 ms now and then before a 10 ms training step stalled the
# consumer 7% of the time while its buffer grew in a hiccup and shrank in the quiet between.
HICCUP_MEMORY = 5.0
# ... and when the consumer stalls within SHRINK_BLAME_SECONDS of a shrink kept since, the
# shrink is taken back and that memory doubles, up to HICCUP_MEMORY_MAX: hiccups covered so
# well that the consumer never waited make what covers them look idle (a 60 ms read every
# 500 elements, 4 -> 1 batches of prefetch and 16 -> 8 threads: 9-17% stall for 3 s).
SHRINK_BLAME_SECONDS = 5.0
HICCUP_MEMORY_MAX = 80.0
# A stage the thread budget stopped while other stages' parked workers held part of it, told
# to end, tries again this soon (they end at once; the mark otherwise holds for seconds).
PARKED_RELEASE_SECONDS = 0.5
# A stage whose workers spend this many times their own work's time taking elements from its
# input waits on that input: the stage it reads from sets the pace, not it (two maps whose
# bottleneck alternates: the second one's 52 threads sat waiting on the first).
INPUT_BOUND = 2.0
# A computing stage shed of its surplus workers keeps this many times those its rate keeps
# busy (Little's law): room for the rate's swings; the experiment takes the move back if it
# costs rate anyway.
WORKERS_MARGIN = 2.0
