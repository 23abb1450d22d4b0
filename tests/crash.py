"""A Lightning callback that raises at a given step: a simulated crash, for the resume tests."""

import lightning as L


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash
