"""``modules.shared_state.State`` stand-in (the attributes and methods A1111 1.10 has that the glue uses)."""

import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.job = job
        self.textinfo = None
        self.interrupted = False
        self.skipped = False

    def end(self):
        self.job = ""
        self.job_count = 0
